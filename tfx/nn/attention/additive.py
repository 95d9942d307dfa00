"""Additive attention (Bahdanau, Cho & Bengio, "Neural Machine Translation by Jointly Learning to
Align and Translate", ICLR 2015), per head, for comparison with dot-product attention.

score_ij = wᵀ tanh(W_q q_i + W_k k_j), with W_q, W_k (d_head -> d_attn) and w (d_attn) per head,
then softmax over the allowed keys. O(T²·d_attn) time; the (Tq, Tk, d_attn) tanh is computed in
chunks of query rows and recomputed chunk by chunk in the backward pass, so memory is
O(B·H·(chunk·Tk·d_attn + Tq·Tk)): the scores and weights as in explicit softmax attention. Causal, bidirectional, padding, bias
(added to the scores), the default KV cache, GQA. Not the dot-product definition: exact = False.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.nn.dropout import dropout as fast_dropout
from tfx.nn.attention.base import AttentionKernel, AttnSpec, full_mask
from tfx.registry import ATTENTION, KindConfig


class AdditiveConfig(KindConfig):
    kind: str = "additive"
    d_attn: int | None = Field(None, gt=0)  # hidden size of the scoring MLP (default d_head)
    chunk: int = Field(64, gt=0)             # query rows per chunk


class _AdditiveScores(torch.autograd.Function):
    """scores (B, H, Tq, Tk) = wᵀ tanh(qa_i + ka_j) in query chunks. The (chunk, Tk, A) tanh is never
    kept: the backward pass recomputes it chunk by chunk (its derivative is 1 - tanh²)."""

    @staticmethod
    def forward(ctx, qa: Tensor, ka: Tensor, w: Tensor, chunk: int) -> Tensor:
        ctx.save_for_backward(qa, ka, w)
        ctx.chunk = chunk
        w = w.to(qa.dtype)[:, None, None, :]  # (H, 1, 1, A)
        return torch.cat([(torch.tanh(qa[:, :, a:a + chunk, None] + ka[:, :, None]) * w).sum(-1)
                          for a in range(0, qa.shape[2], chunk)], dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        qa, ka, w = ctx.saved_tensors
        w_ = w.to(qa.dtype)[:, None, None, :]
        d_qa, d_ka, d_w = torch.zeros_like(qa), torch.zeros_like(ka), torch.zeros_like(w, dtype=qa.dtype)
        for a in range(0, qa.shape[2], ctx.chunk):
            hidden = torch.tanh(qa[:, :, a:a + ctx.chunk, None] + ka[:, :, None])  # (B, H, C, Tk, A)
            g = grad[:, :, a:a + ctx.chunk, :, None].to(qa.dtype)  # (B, H, C, Tk, 1)
            d_w += (hidden * g).sum((0, 2, 3))
            d_pre = g * w_ * (1 - hidden * hidden)
            d_qa[:, :, a:a + ctx.chunk] = d_pre.sum(3)
            d_ka += d_pre.sum(2)
        return d_qa, d_ka, d_w.to(w.dtype), None


@ATTENTION.register("additive", config=AdditiveConfig)
class AdditiveAttention(AttentionKernel):
    """Bahdanau scores per head; everything else as softmax attention."""

    exact = False
    complexity = "O(T^2·d_attn)"

    def __init__(self, cfg: AdditiveConfig, **kw):
        super().__init__(cfg, **kw)
        H, D, A = self.n_heads, self.d_head, cfg.d_attn or self.d_head
        self.w_q = nn.Parameter(torch.randn(H, D, A) / math.sqrt(D))
        self.w_k = nn.Parameter(torch.randn(H, D, A) / math.sqrt(D))
        self.w = nn.Parameter(torch.randn(H, A) / math.sqrt(A))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        if spec.explicit_only:
            raise ValueError("additive attention takes no relative values or score scaling")
        B, H, Tq, _ = q.shape
        rep = H // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, Tk, D)
        qa = torch.einsum("bhtd,hda->bhta", q, self.w_q.to(q.dtype))  # (B, H, Tq, A)
        ka = torch.einsum("bhtd,hda->bhta", k, self.w_k.to(k.dtype))  # (B, H, Tk, A)
        scores = _AdditiveScores.apply(qa, ka, self.w, self.cfg.chunk)  # (B, H, Tq, Tk)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if spec.bias is not None:
            scores = scores + spec.bias.to(scores.dtype)
        mask = full_mask(spec, None, B)  # (B|1, 1, Tq, Tk) or None
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)  # rows with no key: 0
        if self.training and self.dropout:
            weights = fast_dropout(weights, self.dropout)
        return weights @ v  # (B, H, Tq, D)
