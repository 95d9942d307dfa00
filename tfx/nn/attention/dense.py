"""Dense scaled dot-product attention (Vaswani et al., 2017) through PyTorch's SDPA.

O(T^2) time, O(T) extra memory with the fused kernels; causal, cache, bias, GQA/MQA. With Shaw's
relative values or DA's distance scaling it materialises the (Tq, Tk) weights instead.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tfx.nn.dropout import dropout as fast_dropout
from tfx.nn.attention.base import AttentionKernel, AttnSpec, full_mask
from tfx.nn.attention.span import AdaptiveSpan, SpanOptions
from tfx.registry import ATTENTION


class DenseConfig(SpanOptions):
    kind: str = "dense"


def sdpa(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, *, dropout: float = 0.0,
         pattern: Tensor | None = None) -> Tensor:
    """SDPA with the spec's causality, padding, bias and an optional (Tq, Tk) pattern as one mask."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if spec.plain and pattern is None:
        if not spec.causal or Tq == 1:
            # Bidirectional, or one new query that may see every key (all keys precede it).
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
        if Tq == Tk:
            # Keys are exactly the queries' own tokens (no cache, no memory): the fused causal path.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
    mask = full_mask(spec, pattern, q.shape[0])
    if spec.bias is not None:
        bias = spec.bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, *, dropout: float = 0.0,
                       pattern: Tensor | None = None) -> Tensor:
    """Attention through the materialised weights, for Shaw's values and DA's scaling.

    Shaw's value term sums the weights per relative bucket first (scatter_add), then mixes the
    (R, D) table: O(Tq·R·D) instead of a (Tq, Tk, D) gather.
    """
    B, H, Tq, D = q.shape
    rep = H // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, Tq, Tk)
    if spec.score_scale is not None:
        scores = torch.relu(scores) * spec.score_scale.to(scores.dtype)
    if spec.bias is not None:
        scores = scores + spec.bias.to(scores.dtype)
    mask = full_mask(spec, pattern, B)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    acc = torch.promote_types(scores.dtype, torch.float32)  # float32 at least, float64 stays
    weights = torch.softmax(scores.to(acc), dim=-1).nan_to_num(0.0).to(q.dtype)
    weights = fast_dropout(weights, dropout) if dropout else weights
    out = weights @ v  # (B, H, Tq, D)
    if spec.rel_values is not None:
        table, index = spec.rel_values  # (R, D), (Tq, Tk)
        buckets = weights.new_zeros(B, H, Tq, table.shape[0])
        buckets.scatter_add_(-1, index.expand(B, H, Tq, -1), weights)  # (B, H, Tq, R)
        out = out + buckets @ table.to(out.dtype)
    return out


@ATTENTION.register("dense", config=DenseConfig)
class DenseAttention(AttentionKernel):
    """Full softmax attention; SDPA picks the fastest backend for the device."""

    supports_score_mods = True
    softmax_over_keys = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.span = AdaptiveSpan(cfg, self.n_heads) if cfg.adaptive_span else None

    def aux_loss(self) -> Tensor | None:
        return self.span.penalty() if self.span is not None and self.training else None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        p = self.dropout if self.training else 0.0
        if self.span is not None:
            bias = self.span.bias(spec.q_pos, spec.k_pos).to(q.dtype)
            spec = dataclasses.replace(spec, bias=bias if spec.bias is None else spec.bias + bias)
        if spec.explicit_only:
            return explicit_attention(q, k, v, spec, dropout=p)
        return sdpa(q, k, v, spec, dropout=p)
