"""Linformer (Wang, Li, Khabsa, Fang & Ma, "Linformer: Self-Attention with Linear Complexity", 2020).

Keys and values are projected along the sequence axis, from n = max_len positions to k, by learned
E, F (k, n): softmax(Q (E K)ᵀ / √D) (F V). O(T·k) time and memory; bidirectional only (a projection
across positions mixes future tokens into every projected key), so no causal use and no cache; no
bias (projected keys have no positions). Sequences shorter than n use the first Tk columns of E
and F; padded keys and values are zeroed before the projection, so they contribute nothing.

Sharing, as in the paper: "none" (E_h, F_h per head), "headwise" (one E, F per layer), "kv"
(one E = F per layer) and "layerwise" (one E = F for every layer of the stack, kept in the stack's
`shared` dict).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.registry import ATTENTION, KindConfig


class LinformerConfig(KindConfig):
    kind: str = "linformer"
    k: int = Field(64, gt=0)  # projected length
    sharing: Literal["none", "headwise", "kv", "layerwise"] = "headwise"


def _projection(*shape: int) -> nn.Parameter:
    """N(0, 1/n) entries: a projected key has about the norm of one key (n = shape[-1])."""
    return nn.Parameter(torch.randn(*shape) / math.sqrt(shape[-1]))


@ATTENTION.register("linformer", config=LinformerConfig)
class LinformerAttention(AttentionKernel):
    """Low-rank attention through learned sequence projections; O(T·k), bidirectional, no cache."""

    exact = False
    supports_causal = False
    supports_cache = False
    supports_bias = False
    complexity = "O(T·k)"

    def __init__(self, cfg: LinformerConfig, **kw):
        super().__init__(cfg, **kw)
        n, k = self.max_len, cfg.k
        if n <= 0:
            raise ValueError("linformer needs the training context (max_len) to size its projections")
        if cfg.sharing == "none":
            self.E, self.F = _projection(self.n_heads, k, n), _projection(self.n_heads, k, n)
        elif cfg.sharing == "headwise":
            self.E, self.F = _projection(k, n), _projection(k, n)
        elif cfg.sharing == "kv":
            self.E = _projection(k, n)
        else:  # layerwise: one parameter, registered in every layer (state dicts and optimisers dedupe it)
            self.E = self.shared.setdefault(("linformer", k, n), _projection(k, n))

    def projections(self) -> tuple[Tensor, Tensor]:
        """(E, F), each (k, n) or (H, k, n) for sharing = "none"."""
        return self.E, (self.F if self.cfg.sharing in ("none", "headwise") else self.E)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        if spec.causal:
            raise ValueError("linformer is bidirectional only: its projections mix every position")
        if spec.bias is not None or spec.explicit_only:
            raise ValueError("linformer takes no score bias, relative values or score scaling")
        H, Tk = q.shape[1], k.shape[2]
        if Tk > self.max_len:
            raise ValueError(f"linformer projects at most max_len = {self.max_len} keys; got {Tk}")
        if spec.key_padding_mask is not None:
            keep = spec.key_padding_mask[:, None, :, None]  # (B, 1, Tk, 1)
            k, v = k.masked_fill(~keep, 0.0), v.masked_fill(~keep, 0.0)
        E, Fp = (p[..., :Tk].to(k.dtype) for p in self.projections())
        if self.cfg.sharing == "none":  # one projection per query head: repeat the kv heads first
            rep = H // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, Tk, D)
            E, Fp = E[None], Fp[None]  # (1, H, k, Tk)
        kp, vp = E @ k, Fp @ v  # (B, Hkv|H, k, D)
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, kp, vp, dropout_p=p, enable_gqa=kp.shape[1] != H)
