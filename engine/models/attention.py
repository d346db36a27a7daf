"""The layers shared by the models that implement their own encoder: multi-head self-attention through
SDPA and the transformer encoder layer around it.

The math of ``nn.MultiheadAttention`` (q, k, v stacked in one projection, heads contiguous inside
each, scale 1/sqrt(head_dim)), but both projections are plain ``nn.Linear`` modules called in forward,
so LoRA on them really trains. Subclasses name the stacked projection as their official checkpoint
does (scGPT's flash-attn ``Wqkv``, scFoundation's ``in_proj``), so state-dict keys match exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class SdpaSelfAttention(nn.Module):
    #: attribute (and state-dict key prefix) of the stacked q/k/v projection in the official checkpoint
    qkv_name: ClassVar[str]

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        setattr(self, self.qkv_name, nn.Linear(dim, 3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = getattr(self, self.qkv_name)(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout)`` with the official checkpoints' names
    (``self_attn``, ``linear1``/``linear2``, ``norm1``/``norm2``): ReLU feed-forward, LayerNorm eps 1e-5,
    post-norm; ``pre_norm``: scGPT's pre scheme (norm the stream, then add). ``attention`` is the model's
    ``SdpaSelfAttention`` subclass (it names the stacked projection as the model's checkpoint does).
    ``first_only`` (post-norm, with an attention that supports it): the output at position 0 only
    ([n, 1, d]), all a CLS embedding needs of the last layer."""

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float, attention: type[SdpaSelfAttention],
                 pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = attention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, first_only: bool = False) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm1(x)
            x = x + self.dropout1(self.self_attn(x, attn_mask))
            x = self.norm2(x)
            return x + self._ff(x)
        extra: dict[str, Any] = {"first_only": True} if first_only else {}
        h = self.self_attn(x, attn_mask, **extra)
        x = self.norm1((x[:, :1] if first_only else x) + self.dropout1(h))
        return self.norm2(x + self._ff(x))
