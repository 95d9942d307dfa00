"""The kernel contract every attention kind implements, and the dense oracle tests compare to.

Kernels see tensors and a small spec, never the Attention module: q (B, H, Tq, D) and k, v
(B, Hkv, Tk, D) with H a multiple of Hkv (GQA/MQA), positions for masks, an optional padding mask
and an optional additive bias from the position scheme.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class AttnSpec:
    q_pos: Tensor                     # (Tq,) absolute positions of the queries
    k_pos: Tensor                     # (Tk,) absolute positions of the keys (memory < cache < current)
    causal: bool
    key_padding_mask: Tensor | None = None  # (B, Tk) True = attend
    bias: Tensor | None = None        # (1|B, H, Tq, Tk) additive


class AttentionKernel(nn.Module):
    """Base of every attention kind. `exact` kernels equal reference_attention under allowed()."""

    exact: ClassVar[bool] = True
    supports_causal: ClassVar[bool] = True
    supports_bidirectional: ClassVar[bool] = True
    supports_cache: ClassVar[bool] = True
    supports_bias: ClassVar[bool] = True

    def __init__(self, cfg, *, n_heads: int, d_head: int, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.n_heads = n_heads
        self.d_head = d_head
        self.dropout = dropout

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """(Tq, Tk) bool pattern of the kernel itself (beyond causality), or None for all keys."""
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def full_mask(spec: AttnSpec, pattern: Tensor | None, batch: int) -> Tensor | None:
    """The boolean (B|1, 1, Tq, Tk) mask of allowed pairs: pattern & causality & padding."""
    mask = pattern
    if spec.causal:
        causal = spec.k_pos[None, :] <= spec.q_pos[:, None]  # (Tq, Tk)
        mask = causal if mask is None else mask & causal
    if mask is not None:
        mask = mask[None, None]  # (1, 1, Tq, Tk)
    if spec.key_padding_mask is not None:
        pad = spec.key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        mask = pad if mask is None else mask & pad
    return mask


def reference_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec,
                        pattern: Tensor | None = None) -> Tensor:
    """Dense attention written out step by step: the oracle every kernel is tested against.

    Rows with no allowed key give zeros.
    """
    B, H, Tq, D = q.shape
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, Tq, Tk)
    if spec.bias is not None:
        scores = scores + spec.bias
    mask = full_mask(spec, pattern, B)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v  # (B, H, Tq, D)
