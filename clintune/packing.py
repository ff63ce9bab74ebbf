"""Prediction without padding: a batch's notes packed into one sequence for the encoder (CPU).

A batch of B notes padded to T tokens spends the padding's share of every product, LayerNorm and attention on
tokens no head reads: 4.1% of the products and 6.0% of attention's work for the speed benchmark's 797 test
notes, sorted by length and cut into pieces of 4,096 tokens (172,552 real tokens of 179,936; the pieces are
:data:`clintune.training.EVAL_TOKENS_CPU` long). Packed, the
encoder sees one example of N = sum_b L_b tokens, the notes' ids back to back, each note's positions 0 .. L_b
- 1, so the linear layers, LayerNorms and GELUs work on the N real tokens alone. Self-attention is the one
place where notes must not see each other: with offsets starts = (0, L_0, L_0 + L_1, ..., N),

    O[s_b + i] = softmax_j(q[s_b + i] . k[s_b + j] / sqrt(d)) v[s_b + j],   0 <= i, j < L_b,

which clintune's attention (:func:`clintune.fast.attention`) computes from transformers' ``cu_seq_lens_q``
keyword, passed down to the attention function by BERT's layers (the compiled kernels take the offsets:
:func:`clintune.masks.attention`, :func:`~clintune.masks.attention_int8`; elsewhere each note goes to
:func:`clintune.fast.attention` on its own). A last layer trimmed to the first
token (:mod:`clintune.prune`) takes each note's first row. The encoder's output is unpacked to (B, T, H), zeros
at the padding (or (B, 1, H) from a trimmed last layer), so the heads see what they saw before.

Each real token's numbers are those of the padded batch: row-wise operations do not see other rows, and
attention sees the same keys. In bf16 the products' rounding may differ in the last bit where oneDNN blocks
another number of rows differently; with ``--quantize int8`` the dynamic activation ranges are taken over the
real tokens only, no longer over padding as well, so codes move by a step here and there.

Used for prediction on CPU in bf16 where the compiled bf16 kernels attend (:class:`clintune.modeling.Classifier`,
``--fast``; ``--fast-off packing`` leaves it out; AMX CPUs included since the kernels' AMX form: 200 notes in
1.09 s packed against 1.13 s padded through that kernel and 1.17 s padded through PyTorch's SDPA, which AMX CPUs
used before, ``benchmarks/packing.py``; not where the kernels step aside) by encoders whose embeddings take
position ids and whose layers
pass keywords down (:func:`first_position`: BERT's code (BERT, MiniLM, ...), RoBERTa's (CamemBERT,
CamemBERT-bio, DrBERT, XLM-R), ELECTRA's and DistilBERT's); other encoders, and training, keep padded batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: the keyword under which the offsets reach the attention function (transformers' name for them)
STARTS = "cu_seq_lens_q"


@dataclass
class Packed:
    """A padded batch's layout once packed: the notes' offsets and where each token was."""

    starts: torch.Tensor          # (B + 1,) int64: note b is packed rows starts[b] .. starts[b + 1] - 1
    where: torch.Tensor           # (B, T) bool: the padded batch's real tokens (attention_mask != 0)

    def unpack(self, states: torch.Tensor, first_token_only: bool) -> torch.Tensor:
        """The encoder's (1, N, H) packed output -> (B, T, H), zeros at padding; a trimmed last layer's (1, B, H)
        first rows -> (B, 1, H). Rows after the notes' (the filler :func:`pack` adds with ``round_rows``) are
        dropped."""
        b = len(self.starts) - 1
        if first_token_only:
            return states[0, :b].unsqueeze(1)
        out = states.new_zeros((*self.where.shape, states.shape[-1]))
        out[self.where] = states[0, : int(self.starts[b])]
        return out


def rounded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of 2^(floor(log2 n) - 4): 17 row counts from 2^k to 2^(k + 1), each under 1/16
    more rows than ``n`` (``n`` itself below 32)."""
    step = 1 << max(n.bit_length() - 5, 0)
    return -(-n // step) * step


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, first_position: int = 0,
         round_rows: bool = False) -> tuple[dict, Packed] | None:
    """(B, T) ids and mask -> (the encoder's keyword arguments for one packed sequence, its layout); None where
    a note's tokens are not a prefix of its row (left padding, holes): those stay padded. Each note's position
    ids run from ``first_position`` (:func:`first_position`: 0 for BERT, padding_idx + 1 for RoBERTa).

    ``round_rows`` pads the sequence to :func:`rounded_rows` tokens with a filler: one more sequence after the
    notes, attending only to itself (the first ids again), whose rows :meth:`Packed.unpack` drops. The notes'
    rows are computed as without it (row-wise operations, their own keys), and the products see a few row
    counts instead of a new one at almost every batch: oneDNN builds (JIT-compiles) a product for each row count
    it has not seen, 3-5 ms each on the Xeon with AMX, about a tenth of a first bf16 pass over the speed
    benchmark's 797 test notes (``benchmarks/packing.py --first-pass``)."""
    where = attention_mask.bool()
    lengths = where.sum(1)
    t = where.shape[1]
    if not torch.equal(where, torch.arange(t, device=where.device) < lengths[:, None]) or not bool(lengths.all()):
        return None
    starts = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(torch.int64), 0, out=starts[1:])
    positions = torch.arange(first_position, first_position + t, device=where.device).expand_as(where)[where]
    ids = input_ids[where][None]
    layout = Packed(starts, where)
    filler = rounded_rows(ids.shape[1]) - ids.shape[1] if round_rows else 0
    if filler:                                      # fewer than 1/16 of the rows: ids[:, :filler] are there
        ids = torch.cat([ids, ids[:, :filler]], 1)
        positions = torch.cat([positions, first_position + torch.arange(filler, device=where.device) % t])
        starts = torch.cat([starts, starts.new_tensor([ids.shape[1]])])
    # An all-ones mask says "no padding", so transformers builds no mask at all: without one, transformers 5.x
    # (5.25 at least) reads the restarting position ids as packed sequences and builds a block-diagonal (N, N)
    # mask for every forward pass, which clintune's attention would refuse (the offsets already say it).
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions[None],
              STARTS: starts}
    return kwargs, layout


def first_position(encoder: nn.Module) -> int | None:
    """The position id of a packed note's first token, or None where ``encoder`` cannot run packed.

    It can where every part passes the packed layout on and the compiled kernels attend it:
    - the model's forward is BERT's (also RoBERTa's, CamemBERT's, XLM-R's copies), ELECTRA's or DistilBERT's,
      each of which hands ``position_ids`` to its embeddings and its keywords down to the attention function;
    - the embeddings add learned absolute positions from the ``position_ids`` given: BERT's and DistilBERT's
      count from 0, RoBERTa's (and its copies') from padding_idx + 1, as they number a right-padded note;
    - every self-attention module is BERT's or DistilBERT's, at a head size the kernels are compiled for
      (:data:`clintune.masks.ATTENTION_HEAD_SIZES`), and the attention is clintune's with its kernels
      (:func:`clintune.fast.accelerate`; not ``--fast-off attention_kernel``).
    Elsewhere packed notes would attend one at a time (:func:`clintune.fast.attention`'s fallback), or other
    embeddings would number the positions in their own way."""
    from transformers.models.bert import modeling_bert as bert
    from transformers.models.distilbert import modeling_distilbert as distil
    from transformers.models.electra.modeling_electra import ElectraModel
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    from .fast import ATTENTION, _original, _same_code
    from .masks import ATTENTION_HEAD_SIZES

    base = getattr(encoder, "get_base_model", lambda: encoder)()
    config = getattr(base, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) != ATTENTION
            or getattr(config, "is_decoder", False)
            or not any(_same_code(type(base).forward, m.forward)
                       for m in (bert.BertModel, ElectraModel, distil.DistilBertModel))):
        return None
    embeddings = _original(getattr(base, "embeddings", None), "forward")      # what a fused forward stands for
    if _same_code(embeddings, bert.BertEmbeddings.forward) or _same_code(embeddings, distil.Embeddings.forward):
        first = 0
    elif _same_code(embeddings, RobertaEmbeddings.forward) and base.embeddings.padding_idx is not None:
        first = int(base.embeddings.padding_idx) + 1
    else:
        return None
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    attention = [m for m in base.modules() if any(hasattr(m, a) for a in ("query", "q_lin"))]
    if not attention or not all(any(_same_code(type(m).forward, c.forward)
                                    for c in (bert.BertSelfAttention, distil.DistilBertSelfAttention))
                                and getattr(m, "attention_head_size", None) in ATTENTION_HEAD_SIZES
                                for m in attention):
        return None
    return first
