"""Classification heads: token states (B, T, H) and attention mask (B, T) -> class logits (B, K).

Heads are registered by name (``@register_head("grn")``) and built as ``HEADS[name](hidden, k, cfg)``;
they read the options they need from ``cfg`` (pooling, dropout, bottleneck width...).
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


class Head(nn.Module):
    name = ""

    def __init__(self, hidden_size: int, num_labels: int, cfg) -> None:
        super().__init__()
        self.hidden_size, self.num_labels = hidden_size, num_labels
        self.pooling = getattr(cfg, "pooling", "mean")

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@register_head("linear")
class LinearHead(Head):
    """logits = W · dropout(pool(h)) + b, W in R^{K x H}: H·K + K parameters."""

    def __init__(self, hidden_size, num_labels, cfg):
        super().__init__(hidden_size, num_labels, cfg)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, states, mask):
        return self.out(self.dropout(pool(states, mask, self.pooling)))      # (B, K)
