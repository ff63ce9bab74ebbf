"""The encoder's last layer computes only the first token's row when that is all the head reads.

A head that pools ``cls`` (the first token, [CLS] / <s>) and has no token-level part reads one row of the
last layer's output. In that layer, for input states X (B, T, H) and x0 = X[:, :1] its first row:

    K = X W_k,  V = X W_v                      (every token: the first row's attention looks at all of them)
    q0 = x0 W_q,  a0 = softmax(q0 K^T / sqrt(d) + mask0) V          (one query row per head)
    y0 = LN(x0 + drop(a0 W_o)),  out0 = LN(y0 + drop(FFN(y0)))

which is row 0 of the full layer exactly (each row's query, attention, residual, LayerNorm and
feed-forward depend only on that row and on K, V). The query, attention, output and feed-forward work of
the other T - 1 rows is skipped: in MiniLM-L6 at T = 256, about 85% of the last layer's forward FLOPs, so
about 14% of the encoder's, and as much of the backward pass. The BERT classification heads of Hugging
Face (``BertForSequenceClassification``, the peer in ``benchmarks/speed.py``) compute the whole layer and
then read row 0. The encoder's ``last_hidden_state`` becomes (B, 1, H).

It is a class swap on the last layer's attention module (BERT-family layers: ``.attention.self`` with
query/key/value and ``.attention.output``; DistilBERT's blocks), the same parameters and state dict,
undone by :func:`restore`. Encoders of any other shape are left as they are.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .packing import STARTS


def _attention_fn(module: nn.Module):
    """The attention function the module's own forward calls: transformers' registered one for its config's
    implementation, its model file's ``eager_attention_forward`` for "eager"."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)


def _first_row_mask(mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """(B, 1, T, T) attend-mask or bias -> its first query row (B, 1, 1, T); broadcast rows stay as they are."""
    if mask is not None and mask.dim() == 4 and mask.shape[-2] == t:
        return mask[:, :, :1]
    return mask


def _attend_first(module: nn.Module, first: torch.Tensor, states: torch.Tensor, mask, q_lin, k_lin, v_lin,
                  head_size: int, scaling: float, dropout_p: float, starts: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q0 K^T * scaling + mask0) V for q0 from ``first`` (B, 1, H), K and V from ``states`` (B, T, H),
    shaped as ``first`` (B, 1, heads * head_size). With ``starts``, B notes packed into one sequence
    (:mod:`clintune.packing`): ``states`` (1, N, H), ``first`` (1, B, H) their first rows, note b the rows
    starts[b] .. starts[b + 1] - 1; K and V are gathered into (B, longest) with a mask for the rest."""
    q, k, v = q_lin(first), k_lin(states), v_lin(states)     # in this order: LoRA's dropouts draw in it
    if starts is not None:
        lengths = starts[1:] - starts[:-1]
        pos = torch.arange(int(lengths.max()))
        index = (starts[:-1, None] + pos).clamp_(max=states.shape[1] - 1)       # past a note's end: masked out
        flat = index.view(-1)                             # index_select: a third of x[0][index]'s time
        k, v = (x[0].index_select(0, flat).view(*index.shape, -1) for x in (k, v))
        mask = (pos < lengths[:, None])[:, None, None, :]
    else:
        mask = _first_row_mask(mask, states.shape[1])
    b, t, _ = k.shape
    q = q.view(b, 1, -1, head_size).transpose(1, 2)
    k = k.view(b, t, -1, head_size).transpose(1, 2)
    v = v.view(b, t, -1, head_size).transpose(1, 2)
    out, _ = _attention_fn(module)(module, q, k, v, mask, dropout=dropout_p if module.training else 0.0,
                                   scaling=scaling)
    return out.reshape(*first.shape[:-1], -1)


def _first_rows(states: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each note's first row, (B, 1, H) of padded notes, and None; of notes packed into one sequence
    (:mod:`clintune.packing`, their offsets in the layer's keywords) (1, B, H), and the offsets."""
    starts = kwargs.get(STARTS)
    return (states[:, :1] if starts is None else states[:, starts[:-1]]), starts


def _bert_attention_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    sa = self.self
    first, starts = _first_rows(hidden_states, kwargs)
    a = _attend_first(sa, first, hidden_states, attention_mask, sa.query, sa.key, sa.value, sa.attention_head_size,
                      sa.scaling, sa.dropout.p, starts)
    return self.output(a, first), None


def _distilbert_block_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    at = self.attention
    first, starts = _first_rows(hidden_states, kwargs)
    a = _attend_first(at, first, hidden_states, attention_mask, at.q_lin, at.k_lin, at.v_lin,
                      at.attention_head_size, at.scaling, at.dropout.p, starts)
    y = self.sa_layer_norm(at.out_lin(a) + first)
    return self.output_layer_norm(self.ffn(y) + y)


def _is_bert_attention(mod: nn.Module) -> bool:
    sa, out = getattr(mod, "self", None), getattr(mod, "output", None)
    return (sa is not None and out is not None and not getattr(mod, "is_cross_attention", False)
            and all(hasattr(sa, a) for a in ("query", "key", "value", "attention_head_size", "scaling", "dropout",
                                             "config"))
            and getattr(sa, "position_embedding_type", "absolute") == "absolute"
            and not getattr(sa, "is_decoder", False) and not getattr(sa, "is_causal", False))


def _is_distilbert_block(mod: nn.Module) -> bool:
    at = getattr(mod, "attention", None)
    return (at is not None and all(hasattr(mod, a) for a in ("sa_layer_norm", "ffn", "output_layer_norm"))
            and all(hasattr(at, a) for a in ("q_lin", "k_lin", "v_lin", "out_lin", "attention_head_size", "scaling",
                                             "dropout", "config")))


def _last_layer(encoder: nn.Module) -> nn.Module | None:
    """The last element of the encoder's stack of layers (``encoder.layer`` / ``transformer.layer``)."""
    stacks = [m for name, m in encoder.named_modules()
              if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layer" and len(m)]
    return stacks[-1][-1] if len(stacks) == 1 else None


_FORWARDS = {"bert": _bert_attention_forward, "distilbert": _distilbert_block_forward}
_swapped: dict[tuple[type, str], type] = {}


def _swap_class(mod: nn.Module, kind: str) -> None:
    cls = type(mod)
    key = (cls, kind)
    if key not in _swapped:
        _swapped[key] = type(f"FirstToken{cls.__name__}", (cls,), {"forward": _FORWARDS[kind],
                                                                    "_first_token_of": cls})
    mod.__class__ = _swapped[key]


def first_token_only(encoder: nn.Module) -> bool:
    """Make the encoder's last layer compute only the first token's row (see the module docstring).
    True if done (or already so); False, and nothing changed, for an encoder of another shape."""
    layer = _last_layer(encoder)
    if layer is None:
        return False
    if hasattr(type(layer), "_first_token_of") or hasattr(type(getattr(layer, "attention", None)), "_first_token_of"):
        return True
    if _is_bert_attention(getattr(layer, "attention", None) or nn.Module()):
        _swap_class(layer.attention, "bert")
        return True
    if _is_distilbert_block(layer):
        _swap_class(layer, "distilbert")
        return True
    return False


def restore(encoder: nn.Module) -> None:
    """Undo :func:`first_token_only` (the full last layer again)."""
    for mod in encoder.modules():
        original = getattr(type(mod), "_first_token_of", None)
        if original is not None:
            mod.__class__ = original


def head_reads_first_token_only(head: nn.Module) -> bool:
    """Whether a head's output depends on the last layer's first row alone: ``cls`` pooling, no token-level
    part (its ``mix`` is the identity) and a sequence task."""
    from .heads import Head

    return (getattr(head, "pooling", None) == "cls" and not getattr(head, "token_level", True)
            and type(head).mix is Head.mix)
