"""int8 prediction on CPU (``--quantize int8``): the backbone's linear layers and attention in 8-bit integers.

A linear layer y = x W^T + b becomes

    y[i, j] = s_x s_w[j] sum_k (q_x[i, k] - z_x) q_w[j, k] + b[j]

* weights per output channel, symmetric: s_w[j] = max_k |W[j, k]| / 127, q_w = round(W / s_w) in [-127, 127],
  done once when the model is loaded;
* activations per tensor, asymmetric uint8, from each batch's own range ("dynamic" quantisation):
  s_x = (max(x, 0) - min(x, 0)) / 255, z_x = round(-min(x, 0) / s_x) (:func:`clintune.masks.quantize_u8`);
* the integer products and the rescale by oneDNN (``torch.ops.onednn.qlinear_pointwise``, what PyTorch's x86
  quantisation lowers to), written in bf16 under bf16 autocast (the run's precision), else fp32; on CPUs with
  AMX-INT8 tiles (Sapphire Rapids and later), for inputs a multiple of 64 wide and outputs of 32 (BERT's and
  MiniLM's), by clintune's kernel on the tiles (:func:`clintune.masks.int8_linear`: the same function, a
  quarter to a third faster than oneDNN's on MiniLM's shapes, its exact GELU faster than oneDNN's post-op).

This is the scheme of PyTorch's dynamic quantisation and of Q8BERT (Zafrir et al., arXiv 1910.06188; Jacob et
al., CVPR 2018, for the affine mapping), with per-channel weights. On CPUs with AVX-512 VNNI an int8 product does
four multiply-adds per 32-bit lane where bf16 does two: measured on 2 Zen 4 cores, MiniLM's products ran at
0.74-0.88 int8 TOPS against 0.38-0.41 bf16 TFLOP/s. Several linears reading one tensor (query, key and value)
quantise it once. A linear followed by a GELU in the feed-forward block (BERT's intermediate layer, DistilBERT's
``lin1``) applies the GELU inside its product as it writes its output (oneDNN's post-op, or the AMX kernel's:
the same function, of the fp32 sums rather than of their bf16 rounding, and one pass over the 4H-wide
activations fewer).

Self-attention's two products, Q K^T and P V, run in int8 too (:func:`clintune.masks.attention_int8`, on CPUs
with AVX-512 BF16 and VNNI, head size 32 or 64; elsewhere the bf16 kernel): per example and head, each query and
key row and each value column coded symmetrically from its own range, the softmax computed in fp32 and its
unnormalised weights e = exp(s - max s) in [0, 1] coded as round(255 e), the weight that coding leaves out given
to the mean value row. Measured on 2 Zen 4 cores (16 x 12 heads x 256 tokens x 32): 4.6 ms against 7.1 ms for the
bf16 kernel. Where the bf16 kernel runs on AMX tiles it is the faster one (3.6 ms against 4.1 on 2 Xeon cores), and
int8 prediction attends through it (:func:`clintune.fast._int8_attention`).

``--quantize int8-static`` codes the linears' inputs on ranges fixed beforehand ("static" quantisation, Jacob et
al.'s calibrated ranges). First the feed-forward block's hidden activations h = GELU(x W1^T + b1), the widest tensor
(4H per token). Their range [lo, hi] is the smallest and largest value seen over up to 256 calibration notes
(:func:`calibrate`: the training split's, or notes the user gives), s_h and z_h follow from it as above
(:func:`clintune.masks.affine_u8`), and the first product writes the codes q_h = round(clamp(h / s_h + z_h, 0,
255)) directly (oneDNN's output requantisation, after the GELU), which the second reads without a pass of its
own: one pass and half the bytes of h fewer. Every other linear's input (query, key and value; the attention
output; the feed-forward block's input) is coded on its calibrated range too, so no pass finds a range at
prediction time; where a LayerNorm writes that input (BERT's embeddings and sublayer ends on the fused path,
:func:`_producers`), it writes the codes in the same pass (:func:`clintune.masks.add_norm` with ``codes``), and
the linears read them instead of coding the tensor again. A value beyond the calibrated range is clipped to it.
The ranges are saved as ``int8_calibration.json`` beside the model (format 2; a format-1 file, the feed-forward
ranges alone, still loads, the other inputs then dynamic).

Only the encoder is quantised; the head keeps its precision. Predictions may change: a value's error is at most
s_x / 2 before the product, so check the metrics (``clintune evaluate --quantize int8``) before relying on it.
Prediction only: training is unaffected and nothing quantised is saved.
"""
from __future__ import annotations

import functools
import math
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import masks
from .errors import ClintuneError, ConfigError, ModelDirError

CALIBRATION_FILE = "int8_calibration.json"
CALIBRATION_NOTES = 256          # notes whose activations set the static ranges (--quantize int8-static)


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

    def codes_of(self, x: torch.Tensor, fixed: tuple[float, int] | None = None) -> tuple[torch.Tensor, float, int]:
        """x's codes on its own range, or on the ``fixed`` (s, z) (int8-static's calibrated ranges)."""
        version = -1 if x.is_inference() else x._version    # inference tensors keep no version counter
        entry = self.entry
        if entry is not None and entry[0]() is x and entry[1] == version and entry[2] == fixed:
            return entry[3]
        codes = masks.quantize_u8(x.contiguous(), fixed)
        self.entry = (weakref.ref(x), version, fixed, codes)
        return codes


def _int8_weight(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): ``lin``'s weight coded per output channel, symmetric, q = round(W / s) in [-127, 127] (int8),
    s = max_k |W[j, k]| / 127 (fp32)."""
    w = lin.weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A frozen linear layer for prediction with int8 weights and dynamically quantised uint8 inputs (the
    module docstring gives the maths). No gradients: for :class:`~clintune.modeling.Classifier` only."""

    def __init__(self, packed: torch.Tensor | None, scales: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int, shared: _SharedInput, tiles: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gelu: str | None = None          # "none" (exact, erf) or "tanh": GELU applied as the product writes
        self.codes_out: tuple[float, int] | None = None   # (s, z): write uint8 codes y ~ s (q - z) (int8-static)
        self.codes_in: tuple[float, int] | None = None    # (s, z): uint8 input arrives coded so (int8-static)
        self.static_in: tuple[float, int] | None = None   # (s, z): fp32/bf16 input coded on this range (int8-static)
        self.seen: list[float] | None = None              # calibrating: [min, max] of the inputs seen
        self.tiles = tiles                    # the weight on AMX tiles (masks.int8_tiles), or None: oneDNN's (packed)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("zeros", torch.zeros(out_features, dtype=torch.int32), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._shared = shared

    @classmethod
    def from_linear(cls, lin: nn.Linear, shared: _SharedInput) -> "Int8Linear":
        """The int8 layer of ``lin``: its products on AMX tiles where they run and take its shape
        (:func:`clintune.masks.int8_linear`), else in oneDNN's ``qlinear_pointwise``."""
        q, scales = _int8_weight(lin)
        bias = None if lin.bias is None else lin.bias.detach().float().contiguous()
        if masks.int8_linear_available(lin.in_features, lin.out_features):
            return cls(None, scales.contiguous(), bias, lin.in_features, lin.out_features, shared, masks.int8_tiles(q))
        return cls(torch.ops.onednn.qlinear_prepack(q, None), scales.contiguous(), bias, lin.in_features,
                   lin.out_features, shared)

    def take_gelu(self, kind: str, lin: nn.Linear) -> None:
        """Apply the GELU ``kind`` ("none": exact, "tanh") to the output as it is written: the AMX kernel's exact
        GELU, or oneDNN's post-op (its tanh GELU: oneDNN's product then, ``lin`` the layer this one was made from)."""
        self.gelu = kind
        if kind != "none" and self.tiles is not None:
            self.packed, self.tiles = torch.ops.onednn.qlinear_prepack(_int8_weight(lin)[0], None), None

    def extra_repr(self) -> str:
        gelu = "" if self.gelu is None else f", then GELU (approximate={self.gelu!r})"
        codes = ("" if self.codes_out is None else ", writes uint8 codes") + (
            "" if self.static_in is None else ", input on a calibrated range")
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{gelu}{codes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8 and self.codes_in is not None:
            q, (scale, zero) = x, self.codes_in          # coded by the layer before on the calibrated range
        elif x.dtype in (torch.float32, torch.bfloat16):
            if self.seen is not None:
                lo, hi = (float(v) for v in torch.aminmax(x.detach()))
                if math.isfinite(lo) and math.isfinite(hi):
                    self.seen[0], self.seen[1] = min(self.seen[0], lo), max(self.seen[1], hi)
            fixed = self.static_in
            made = getattr(x, masks.U8_CODES, None) if fixed is not None else None
            if made is not None and made[1] == fixed:    # coded on this range by the LayerNorm that wrote x
                q, (scale, zero) = made[0], fixed
            else:                                        # keyed on x itself: a reshaped view is a new object
                q, scale, zero = self._shared.codes_of(x, fixed)
        else:
            raise TypeError(f"Int8Linear: fp32 or bf16 input{' or its uint8 codes' if self.codes_in else ''}, "
                            f"not {x.dtype}")
        if self.codes_out is not None:
            out, (out_scale, out_zero) = torch.uint8, self.codes_out
        else:
            out, out_scale, out_zero = x.dtype if x.is_floating_point() else torch.float32, 1.0, 0
            if torch.is_autocast_enabled("cpu"):
                out = torch.get_autocast_dtype("cpu")
        if self.tiles is not None:
            y = masks.int8_linear(q.reshape(-1, self.in_features).contiguous(), scale, zero, self.tiles, self.scales,
                                  self.bias, gelu=self.gelu == "none", codes=self.codes_out,
                                  out=out if out in (torch.float32, torch.bfloat16) else torch.float32)
            return y.to(out).view(*x.shape[:-1], self.out_features)
        y = torch.ops.onednn.qlinear_pointwise(q.view(-1, self.in_features), scale, zero, self.packed, self.scales,
                                               self.zeros, self.bias, out_scale, out_zero, out,
                                               "none" if self.gelu is None else "gelu", [], self.gelu or "")
        return y.view(*x.shape[:-1], self.out_features)


def require_cpu(quantize: str, device: torch.device) -> None:
    """Refuse ``quantize`` other than "none" for prediction on anything but the CPU (one line to the user)."""
    if quantize != "none" and device.type != "cpu":
        raise ConfigError(f"--quantize {quantize}: CPU prediction only, not {device.type}; use --device cpu "
                          "(device='cpu' from Python) or drop --quantize")


def _linear_then_gelu(encoder: nn.Module):
    """(module, linear's name, activation's name, algorithm) for each feed-forward block whose code is a linear
    then its activation and whose activation is a GELU: BERT's intermediate layer (and its copies in RoBERTa,
    CamemBERT ...: the same code), DistilBERT's FFN."""
    from transformers.models.bert.modeling_bert import BertIntermediate
    from transformers.models.distilbert.modeling_distilbert import FFN

    from .fast import _original, _same_code, gelu_algorithm

    shapes = (("forward", BertIntermediate.forward, "dense", "intermediate_act_fn"),
              ("ff_chunk", FFN.ff_chunk, "lin1", "activation"))
    for mod in encoder.modules():
        for method, code, lin, act in shapes:
            if _same_code(_original(mod, method), code) and isinstance(getattr(mod, act, None), nn.Module):
                kind = gelu_algorithm(getattr(mod, act))
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
    made = {}
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        setattr(parent, attr, Int8Linear.from_linear(mod, shared))
        made[id(getattr(parent, attr))] = mod
    for mod, lin, act, kind in list(_linear_then_gelu(encoder)):
        getattr(mod, lin).take_gelu(kind, made[id(getattr(mod, lin))])
        setattr(mod, act, nn.Identity())
    for mod in encoder.modules():
        if getattr(mod, "is_causal", None) is False:     # what clintune's attention takes (clintune.fast.attention)
            mod.int8_attention = True
    return len(targets)


def static_sites(encoder: nn.Module) -> list[tuple[str, Int8Linear, Int8Linear]]:
    """(name of the second linear, first linear, second linear) of each feed-forward block of a quantised
    encoder whose first linear applies the GELU (:func:`quantize_int8`) and whose output reaches the second
    linear and nothing else: BERT's ``intermediate`` -> ``output.dense`` (and RoBERTa's, CamemBERT's ... copies of
    that code), DistilBERT's ``lin1`` -> ``lin2``. These are what ``--quantize int8-static`` codes statically."""
    from transformers.models.bert.modeling_bert import BertIntermediate, BertLayer, BertSelfOutput
    from transformers.models.distilbert.modeling_distilbert import FFN

    from .fast import _original, _same_code, _sublayer_end_forward

    def fused(lin) -> bool:
        return isinstance(lin, Int8Linear) and lin.gelu is not None

    sites = []
    for name, mod in encoder.named_modules():
        cls = type(mod)
        if _same_code(getattr(cls, "ff_chunk", None), FFN.ff_chunk):
            if fused(getattr(mod, "lin1", None)) and isinstance(getattr(mod, "activation", None), nn.Identity) \
                    and isinstance(getattr(mod, "lin2", None), Int8Linear):
                sites.append((f"{name}.lin2", mod.lin1, mod.lin2))
        elif _same_code(getattr(cls, "feed_forward_chunk", None), BertLayer.feed_forward_chunk):
            up, down = getattr(mod, "intermediate", None), getattr(mod, "output", None)
            if (_same_code(_original(up, "forward"), BertIntermediate.forward)
                    and fused(getattr(up, "dense", None)) and isinstance(up.intermediate_act_fn, nn.Identity)
                    and (type(down).forward is _sublayer_end_forward
                         or _same_code(getattr(type(down), "forward", None), BertSelfOutput.forward))
                    and isinstance(getattr(down, "dense", None), Int8Linear)):
                sites.append((f"{name}.output.dense", up.dense, down.dense))
    return sites


def _input_sites(encoder: nn.Module) -> dict[str, "Int8Linear"]:
    """Every quantised linear of ``encoder`` whose input is fp32 or bf16 (not a feed-forward block's second
    linear, which reads the first's codes: :func:`static_sites`), by name."""
    downs = {id(down) for _, _, down in static_sites(encoder)}
    return {name: mod for name, mod in encoder.named_modules() if isinstance(mod, Int8Linear) and id(mod) not in downs}


def _producers(encoder: nn.Module) -> list[tuple[nn.Module, list["Int8Linear"]]]:
    """(LayerNorm module, the linears reading its output) where BERT's code (and its copies) has them: the
    embeddings -> the first layer's query, key and value; each layer's attention output (its sublayer end) ->
    its feed-forward block's first linear; each layer's output -> the next layer's query, key and value. A
    fused one of these (:func:`clintune.fast.fuse_passes`) writes its output's codes in the same pass when
    told their range (``codes_next``)."""
    layers = next((m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m)
                   and all(hasattr(x, "attention") and hasattr(x, "intermediate") and hasattr(x, "output") for x in m)),
                  None)
    if layers is None:
        return []

    def qkv(layer) -> list:
        sa = getattr(layer.attention, "self", None)
        return [getattr(sa, n, None) for n in ("query", "key", "value")]

    pairs = [(getattr(encoder, "embeddings", None), qkv(layers[0]))]
    for i, layer in enumerate(layers):
        pairs.append((getattr(layer.attention, "output", None), [getattr(layer.intermediate, "dense", None)]))
        if i + 1 < len(layers):
            pairs.append((layer.output, qkv(layers[i + 1])))
    return [(p, readers) for p, readers in pairs
            if p is not None and readers and all(isinstance(r, Int8Linear) for r in readers)]


def calibrate(encoder: nn.Module, run: Callable[[], object]) -> dict[str, list[float]]:
    """The range [min, max] of each quantised linear's input over everything ``run()`` passes through
    ``encoder``, which predicts with dynamic codes meanwhile: the static sites' (:func:`static_sites`: the GELU's
    output) and every other linear's (:func:`_input_sites`), by the linear's name."""
    sites = static_sites(encoder)
    if not sites:
        raise ClintuneError("--quantize int8-static: this encoder has no feed-forward block whose GELU int8 "
                            "prediction applies in its product (BERT- and DistilBERT-style ones have); use --quantize "
                            "int8")
    _clear_static(encoder)
    linears = {**_input_sites(encoder), **{name: down for name, _, down in sites}}
    for lin in linears.values():
        lin.seen = [math.inf, -math.inf]
    try:
        run()
        ranges = {name: list(lin.seen) for name, lin in linears.items()}
    finally:
        for lin in linears.values():
            lin.seen = None
    unseen = [name for name, _, _ in sites if ranges[name][0] > ranges[name][1]]
    if unseen:
        raise ClintuneError(f"--quantize int8-static: no calibration activations reached {unseen[0]} "
                            "(no notes to calibrate on?)")
    return {name: r for name, r in ranges.items() if r[0] <= r[1]}


def _clear_static(encoder: nn.Module) -> None:
    """Back to dynamic codes everywhere (what calibrating predicts with)."""
    for mod in encoder.modules():
        if isinstance(mod, Int8Linear):
            mod.codes_out = mod.codes_in = mod.static_in = None
        if getattr(mod, "codes_next", None) is not None:
            mod.codes_next = None


def set_static(encoder: nn.Module, ranges: dict, source: str) -> None:
    """Code each static site's input on its calibrated range, and each other linear's input whose range
    ``ranges`` holds (:func:`calibrate`'s, or read from ``source``, which the one-line error names when they do
    not fit this encoder; a calibration of format 1 holds the static sites' alone, and the others stay
    dynamic); the LayerNorms that write those inputs (:func:`_producers`) write their codes too."""
    sites = static_sites(encoder)
    names = sorted(name for name, _, _ in sites)
    inputs = _input_sites(encoder)
    if not isinstance(ranges, dict) or not set(names) <= set(ranges) or not set(ranges) <= set(names) | set(inputs):
        raise ModelDirError(f"{source}: its calibrated ranges are for other layers than this model's {len(names)} "
                            "feed-forward blocks")
    for name, r in ranges.items():
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
                and all(math.isfinite(v) for v in r) and r[0] <= r[1]):
            raise ModelDirError(f"{source}: the range of {name} is not two finite numbers, low first")
    _clear_static(encoder)
    for name, up, down in sites:
        up.codes_out = down.codes_in = masks.affine_u8(float(ranges[name][0]), float(ranges[name][1]))
    for name, lin in inputs.items():
        if name in ranges:
            lin.static_in = masks.affine_u8(float(ranges[name][0]), float(ranges[name][1]))
    for producer, readers in _producers(encoder):
        # the range most of its readers take (the last layer's query, for [CLS] alone, may have its own)
        wanted = [r.static_in for r in readers if r.static_in is not None]
        if wanted:
            producer.codes_next = max(set(wanted), key=wanted.count)


def read_calibration(directory: Path) -> dict:
    """The ranges saved in ``directory``'s :data:`CALIBRATION_FILE`; a one-line error if absent or corrupt."""
    import json

    path = Path(directory) / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{directory}: no int8 calibration ({CALIBRATION_FILE}: the model was not trained with "
                            "--quantize int8-static); give notes to calibrate on (--calibration FILE) or use "
                            "--quantize int8") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelDirError(f"{path}: corrupt (not valid JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("ranges"), dict):
        raise ModelDirError(f"{path}: no ranges")
    return data
