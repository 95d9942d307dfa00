"""Dense scaled dot-product attention (Vaswani et al., 2017) through PyTorch's SDPA.

O(T^2) time, O(T) extra memory with the fused kernels; causal, cache, bias, GQA/MQA.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec, full_mask
from tfx.registry import ATTENTION, KindConfig


class DenseConfig(KindConfig):
    kind: str = "dense"


@ATTENTION.register("dense", config=DenseConfig)
class DenseAttention(AttentionKernel):
    """Full softmax attention; SDPA picks the fastest backend for the device."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq, Tk = q.shape[2], k.shape[2]
        p = self.dropout if self.training else 0.0
        gqa = k.shape[1] != q.shape[1]
        plain = spec.key_padding_mask is None and spec.bias is None
        if plain and (not spec.causal or Tq == 1):
            # Bidirectional, or one new query that may see every key (all keys precede it).
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa)
        if plain and Tq == Tk:
            # Keys are exactly the queries' own tokens (no cache, no memory): the fused causal path.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        mask = full_mask(spec, None, q.shape[0])
        if spec.bias is not None:
            bias = spec.bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
