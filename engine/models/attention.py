"""Multi-head self-attention through SDPA, shared by the models that implement their own encoder.

The math of ``nn.MultiheadAttention`` (q, k, v stacked in one projection, heads contiguous inside
each, scale 1/sqrt(head_dim)), but both projections are plain ``nn.Linear`` modules called in forward,
so LoRA on them really trains. Subclasses name the stacked projection as their official checkpoint
does (scGPT's flash-attn ``Wqkv``, scFoundation's ``in_proj``), so state-dict keys match exactly.
"""

from __future__ import annotations

from typing import ClassVar

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
