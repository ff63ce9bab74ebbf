"""Classification heads: token states (B, T, H) and attention mask (B, T) -> class logits (B, K).

Heads are registered by name (``@register_head("name")``) and built as ``HEADS[name](hidden, k, cfg)``;
they read the options they need from ``cfg`` (``pooling``, ``head_dropout``, ``head_dim``, ``head_heads``).

The four adapter heads are those compared by Le et al. (arXiv 2407.19299) as final layers of French
biomedical encoders: Adapter, Lightweight, TinyAttention and GRN. Their defaults (``head_dim`` 64, one
attention head) add 29k-100k parameters to a 384-wide encoder for two classes (lightweight 29,058, adapter
50,370, grn 80,258, tinyattention 99,650): they fit a 2 GB GPU with room to spare.
Heads that work on every token (adapter, tinyattention) see padded positions too, but pooling masks
them out, so padding never changes a prediction; lightweight and grn work on the pooled vector.

Every head is two parts: ``mix`` (token states -> token states: identity, or the adapter/attention
block) and ``vector`` (one H-vector -> K logits). A sequence task pools between them,
``vector(pool(mix(h)))`` -> (B, K); a token task (NER, ``cfg.task == "ner"``) applies ``vector`` to
every token, ``vector(mix(h))`` -> (B, T, K).
"""
from __future__ import annotations

import torch
from torch import nn

HEADS: dict[str, type["Head"]] = {}


def register_head(name: str):
    def deco(cls):
        cls.name = name
        HEADS[name] = cls
        return cls
    return deco


def pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H). ``mean``: average over real tokens; ``cls``: the first token."""
    if how == "cls":
        return states[:, 0]
    m = mask.unsqueeze(-1).to(states.dtype)                       # (B, T, 1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)           # (B, H)


class WindowPool(nn.Module):
    """Pools the window vectors of each long note (``--long chunk``) into one vector.

        mean:      v = (1/W) sum_w u_w
        max:       v_j = max_w u_wj
        attention: a_w = softmax_w(s . u_w + c),  v = sum_w a_w u_w     (s in R^H, c: learned)

    ``u`` (Nw, H) are the windows of a batch back to back; ``owner`` (Nw,) says which note each belongs to.
    """

    def __init__(self, how: str, hidden_size: int) -> None:
        super().__init__()
        self.how = how
        self.score = nn.Linear(hidden_size, 1) if how == "attention" else None

    def forward(self, u: torch.Tensor, owner: torch.Tensor, n_notes: int) -> torch.Tensor:
        h = u.shape[1]
        idx = owner[:, None].expand(-1, h)                                            # (Nw, H)
        if self.how == "max":
            out = torch.full((n_notes, h), float("-inf"), dtype=u.dtype, device=u.device)
            return out.scatter_reduce(0, idx, u, reduce="amax", include_self=True)
        if self.how == "attention":
            s = self.score(u).squeeze(-1).float()                                     # (Nw,)
            smax = torch.full((n_notes,), float("-inf"), device=u.device).scatter_reduce(
                0, owner, s, reduce="amax", include_self=True)
            e = torch.exp(s - smax[owner])
            den = torch.zeros(n_notes, device=u.device).index_add(0, owner, e)
            w = (e / den[owner]).to(u.dtype)[:, None]                                 # (Nw, 1)
            return torch.zeros(n_notes, h, dtype=u.dtype, device=u.device).index_add(0, owner, w * u)
        total = torch.zeros(n_notes, h, dtype=u.dtype, device=u.device).index_add(0, owner, u)
        count = torch.zeros(n_notes, device=u.device).index_add(0, owner, torch.ones_like(owner, dtype=torch.float))
        return total / count[:, None].to(u.dtype)


class Head(nn.Module):
    name = ""

    def __init__(self, hidden_size: int, num_labels: int, cfg) -> None:
        super().__init__()
        self.hidden_size, self.num_labels = hidden_size, num_labels
        self.pooling = getattr(cfg, "pooling", "mean")
        self.token_level = getattr(cfg, "task", "classification") == "ner"
        if getattr(cfg, "long", "truncate") == "chunk":
            self.window_pool = WindowPool(cfg.chunk_pooling, hidden_size)

    def forward_windows(self, states: torch.Tensor, mask: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Windows of long notes: (Nw, T, H) -> pooled per window -> pooled per note -> (B, K)."""
        u = pool(self.mix(states, mask), mask, self.pooling)                            # (Nw, H)
        return self.vector(self.window_pool(u, owner, int(owner.max()) + 1))            # (B, K)

    def init_from_backbone(self, init_std: float, pooler: dict | None) -> None:
        """Called once on a new head (never on reload) with the backbone's initialiser scale
        (``config.initializer_range``) and its checkpoint's pooler weights ({weight, bias}) if it has
        them. Heads keep PyTorch's default initialisation unless they say otherwise."""

    def mix(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, H): the part that sees every token (identity by default)."""
        return states

    def vector(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """(..., H) -> (..., K)."""
        raise NotImplementedError

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.mix(states, mask)                                      # (B, T, H)
        if self.token_level:
            return self.vector(h)                                       # (B, T, K)
        return self.vector(pool(h, mask, self.pooling))                 # (B, K)


@register_head("linear")
class LinearHead(Head):
    """logits = W dropout(pool(h)) + b, W in R^{K x H}: H K + K parameters."""

    def __init__(self, hidden_size, num_labels, cfg):
        super().__init__(hidden_size, num_labels, cfg)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def vector(self, x):
        return self.out(self.dropout(x))


@register_head("mlp")
class MLPHead(Head):
    """A dense + tanh layer and a linear classifier on the pooled vector x, in the form of RoBERTa's
    ``ClassificationHead`` (dropout on both sides of the dense layer), PyTorch's default initialisation:

        logits = W2 dropout(tanh(W1 dropout(x) + b1)) + b2,   W1 in R^{H x H}, W2 in R^{K x H}

    H^2 + H + H K + K parameters. PyTorch's initialisation (uniform, standard deviation 1/sqrt(3 H))
    trains on narrow encoders too; ``pooler`` is BERT's form with transformers' initialisation.
    """

    def __init__(self, hidden_size, num_labels, cfg):
        super().__init__(hidden_size, num_labels, cfg)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)

    def vector(self, x):
        return self.out(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


@register_head("pooler")
class PoolerHead(MLPHead):
    """The head ``transformers``' ``BertForSequenceClassification`` trains: BERT's pooler, then a linear
    classifier (Devlin et al., arXiv 1810.04805), on the pooled vector x ([CLS] with ``--pooling cls``,
    as in BERT):

        logits = W2 dropout(tanh(W1 x + b1)) + b2,   W1 in R^{H x H}, W2 in R^{K x H}

    W1, b1 start from the checkpoint's pooler where it has one, else W1 ~ N(0, s^2) and b1 = 0; W2 ~
    N(0, s^2), b2 = 0; s is the backbone's ``initializer_range`` (0.02 for BERT). This is the model a
    Hugging Face Trainer + PEFT user trains (peft's ``modules_to_save`` covers pooler and classifier),
    so ``--head pooler --pooling cls`` compares like with like (``benchmarks/speed.py``). The layers and
    parameters of ``mlp`` (H^2 + H + H K + K), in another form and initialisation. Small initial weights
    make the first steps slow on narrow encoders (hidden size 32 in the tests), which is why ``mlp``
    stays the default.
    """

    def init_from_backbone(self, init_std, pooler):
        with torch.no_grad():
            if pooler is not None and tuple(pooler["weight"].shape) == tuple(self.dense.weight.shape):
                self.dense.weight.copy_(pooler["weight"])
                self.dense.bias.copy_(pooler["bias"])
            else:
                self.dense.weight.normal_(0.0, init_std)
                self.dense.bias.zero_()
            self.out.weight.normal_(0.0, init_std)
            self.out.bias.zero_()

    def vector(self, x):
        return self.out(self.dropout(torch.tanh(self.dense(x))))


@register_head("adapter")
class AdapterHead(Head):
    """Bottleneck adapter (Houlsby et al., arXiv 1902.00751; AdaptFormer, arXiv 2205.13535) on every token.

        h'_t = h_t + W_up ReLU(W_down h_t + b_down) + b_up,   W_down in R^{r x H}, W_up in R^{H x r}
        logits = W_out dropout(pool(h')) + b_out

    W_up starts at zero, so the head starts as a linear head on pool(h). Parameters:
    (H r + r) + (r H + H) + (H K + K), with r = ``head_dim``.
    """

    def __init__(self, hidden_size, num_labels, cfg):
        super().__init__(hidden_size, num_labels, cfg)
        r = cfg.head_dim
        self.down = nn.Linear(hidden_size, r)
        self.up = nn.Linear(r, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def mix(self, states, mask):
        return states + self.up(torch.relu(self.down(states)))              # (B, T, H)

    def vector(self, x):
        return self.out(self.dropout(x))


@register_head("lightweight")
class LightweightHead(Head):
    """Lightweight adapter as in Le et al. (arXiv 2407.19299): a linear down-projection, a second linear
    layer and LayerNorm, then the classifier, on the pooled representation.

        z = LayerNorm(W_2 (W_1 pool(h) + b_1) + b_2),  W_1 in R^{r x H}, W_2 in R^{r x r}
        logits = W_out dropout(z) + b_out

    The LayerNorm is the only non-linearity. Parameters: (H r + r) + (r r + r) + 2 r + (r K + K).
    """

    def __init__(self, hidden_size, num_labels, cfg):
        super().__init__(hidden_size, num_labels, cfg)
        r = cfg.head_dim
        self.down = nn.Linear(hidden_size, r)
        self.second = nn.Linear(r, r)
        self.norm = nn.LayerNorm(r)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.out = nn.Linear(r, num_labels)

    def vector(self, x):
        return self.out(self.dropout(self.norm(self.second(self.down(x)))))   # (..., H) -> (..., r) -> (..., K)


@register_head("tinyattention")
class TinyAttentionHead(Head):
    """Tiny attention adapter (Zhao et al., arXiv 2211.01979): small-dimensional self-attention over the
    tokens, added back to the token states, then pooled and classified.

        Q, K, V = h W_q, h W_k, h W_v                   (B, T, d), d = ``head_dim``, split in n heads
        A = softmax(Q K^T / sqrt(d/n) + mask) V          masked scaled dot-product attention (SDPA)
        h' = h + A W_o,  W_o in R^{d x H} (zero-initialised: the head starts linear)
        logits = W_out dropout(pool(h')) + b_out

    Parameters: 3 (H d + d) + (d H + H) + (H K + K).
    """

    def __init__(self, hidden_size, num_labels, cfg):
        super().__init__(hidden_size, num_labels, cfg)
        d, self.n_heads = cfg.head_dim, cfg.head_heads
        if d % self.n_heads:
            from .errors import ConfigError
            raise ConfigError(f"--head-dim {d} must be divisible by --head-heads {self.n_heads}")
        self.qkv = nn.Linear(hidden_size, 3 * d)
        self.o = nn.Linear(d, hidden_size)
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.o.bias)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def mix(self, states, mask):
        b, t, _ = states.shape
        q, k, v = self.qkv(states).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, n, T, d/n)
        keep = mask.bool()[:, None, None, :]                                                 # (B, 1, 1, T)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)              # (B, n, T, d/n)
        return states + self.o(a.transpose(1, 2).reshape(b, t, -1))                          # (B, T, H)

    def vector(self, x):
        return self.out(self.dropout(x))


@register_head("grn")
class GRNHead(Head):
    """Gated Residual Network (Lim et al., Temporal Fusion Transformers, arXiv 1912.09363) on the pooled
    representation a = pool(h), with a bottleneck of width r = ``head_dim``; the best head of Le et al.
    (F1 0.88).

        eta_2 = ELU(W_2 a + b_2)                        W_2 in R^{r x H}
        eta_1 = W_1 eta_2 + b_1                         W_1 in R^{r x r}
        GLU(x) = sigmoid(W_4 x + b_4) * (W_5 x + b_5)   W_4, W_5 in R^{H x r}
        z = LayerNorm(a + GLU(dropout(eta_1)))
        logits = W_out dropout(z) + b_out

    Like TFT's GRN it transforms one vector per example (applying it to every token would cost T times
    more for the same parameters). Parameters: (H r + r) + (r r + r) + 2 (r H + H) + 2 H + (H K + K).
    """

    def __init__(self, hidden_size, num_labels, cfg):
        super().__init__(hidden_size, num_labels, cfg)
        r = cfg.head_dim
        self.w2 = nn.Linear(hidden_size, r)
        self.w1 = nn.Linear(r, r)
        self.gate = nn.Linear(r, 2 * hidden_size)      # [W_5; W_4] in one matrix: glu() gates the first half
        self.inner_dropout = nn.Dropout(cfg.head_dropout)
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def vector(self, a):
        eta = self.w1(nn.functional.elu(self.w2(a)))                                      # (..., r)
        z = self.norm(a + nn.functional.glu(self.gate(self.inner_dropout(eta)), dim=-1))  # (..., H)
        return self.out(self.dropout(z))                                                  # (..., K)
