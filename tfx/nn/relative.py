"""Relative position schemes: shaw, xl, da (per layer, through `adjust`) and t5 (a static bias).

Every one is a function of q_pos - k_pos only, so a KV cache, an XL memory or a longer evaluation
context needs no special case.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.nn.positions import PositionScheme, sinusoid_table
from tfx.registry import POSITION, KindConfig


def gather_rel(scores: Tensor, index: Tensor) -> Tensor:
    """(B, H, Tq, R) scores per relative bucket -> (B, H, Tq, Tk) by a (Tq, Tk) bucket index."""
    B, H = scores.shape[:2]
    return scores.gather(-1, index.expand(B, H, *index.shape))


def add_bias(spec, bias: Tensor):
    return dataclasses.replace(spec, bias=bias if spec.bias is None else spec.bias + bias)


class ShawConfig(KindConfig):
    kind: str = "shaw"
    max_distance: int = Field(16, gt=0)  # k: relative distances are clipped to [-k, k]


@POSITION.register("shaw", config=ShawConfig)
class Shaw(PositionScheme):
    """Relative position representations (Shaw et al., 2018): per layer, learned vectors a^K and
    a^V for each clipped distance clip(j - i, -k, k), shared by the heads, added to the keys
    (as the score bias q_i·a^K_ij / sqrt(d)) and to the values (out_i += sum_j w_ij a^V_ij)."""

    relative = True
    learns_in_attention = True
    uses_bias = True
    needs_score_mods = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        R = 2 * cfg.max_distance + 1
        self.keys = nn.Parameter(torch.randn(self.n_layers, R, self.d_head) * 0.02)
        self.values = nn.Parameter(torch.randn(self.n_layers, R, self.d_head) * 0.02)

    def buckets(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        k = self.cfg.max_distance
        return (k_pos[None, :] - q_pos[:, None]).clamp(-k, k) + k  # (Tq, Tk)

    def adjust(self, q: Tensor, spec, layer: int):
        index = self.buckets(spec.q_pos, spec.k_pos)
        scores = q @ self.keys[layer].to(q.dtype).T / math.sqrt(self.d_head)  # (B, H, Tq, R)
        spec = add_bias(spec, gather_rel(scores, index))
        return q, dataclasses.replace(spec, rel_values=(self.values[layer], index))


class XLConfig(KindConfig):
    kind: str = "xl"
    base: float = 10000.0


@POSITION.register("xl", config=XLConfig)
class TransformerXL(PositionScheme):
    """Transformer-XL relative encoding (Dai et al., 2019): the score of query i and key j is
    (q_i + u)·k_j + (q_i + v)·W_r R_{i-j}, R a sinusoid of the distance, W_r per layer, the
    content bias u and position bias v per head and shared by the layers (as in the paper)."""

    relative = True
    learns_in_attention = True
    uses_bias = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.u = nn.Parameter(torch.zeros(self.n_heads, self.d_head))
        self.v = nn.Parameter(torch.zeros(self.n_heads, self.d_head))
        self.proj = nn.ModuleList(nn.Linear(self.d_model, self.n_heads * self.d_head, bias=False)
                                  for _ in range(self.n_layers))

    def adjust(self, q: Tensor, spec, layer: int):
        q_pos, k_pos = spec.q_pos, spec.k_pos
        lo = q_pos[0] - k_pos[-1]  # the smallest distance i - j; distances run lo, lo + 1, ...
        n = q.shape[2] + k_pos.shape[0] - 1  # positions are contiguous
        dist = lo + torch.arange(n, device=q.device)  # (n,)
        r = self.proj[layer](sinusoid_table(dist, self.d_model, self.cfg.base).to(q.dtype))  # (n, H*D)
        r = r.view(n, self.n_heads, self.d_head)
        scores = torch.einsum("bhqd,nhd->bhqn", q + self.v[:, None].to(q.dtype), r) / math.sqrt(self.d_head)
        index = q_pos[:, None] - k_pos[None, :] - lo  # (Tq, Tk) in [0, n)
        return q + self.u[:, None].to(q.dtype), add_bias(spec, gather_rel(scores, index))


class DAConfig(KindConfig):
    kind: str = "da"


@POSITION.register("da", config=DAConfig)
class DistanceAware(PositionScheme):
    """DA-Transformer (Wu et al., 2021): per layer and head, the distance |i - j| is weighted by a
    learned w, mapped by a learned sigmoid (1 + e^v) / (1 + e^(v - w|i-j|)) and multiplies the
    ReLU-clipped scores before the softmax. w = v = 0 at the start: a scale of 1 everywhere."""

    relative = True
    learns_in_attention = True
    needs_score_mods = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.w = nn.Parameter(torch.zeros(self.n_layers, self.n_heads))
        self.v = nn.Parameter(torch.zeros(self.n_layers, self.n_heads))

    def adjust(self, q: Tensor, spec, layer: int):
        dist = (spec.q_pos[:, None] - spec.k_pos[None, :]).abs().float()  # (Tq, Tk)
        w, v = self.w[layer][:, None, None], self.v[layer][:, None, None]  # (H, 1, 1)
        scale = (1 + v.exp()) / (1 + (v - w * dist).exp())  # (H, Tq, Tk)
        return q, dataclasses.replace(spec, score_scale=scale[None].to(q.dtype))


class T5Config(KindConfig):
    kind: str = "t5"
    buckets: int = Field(32, gt=1)
    max_distance: int = Field(128, gt=1)


def t5_buckets(rel: Tensor, *, causal: bool, buckets: int, max_distance: int) -> Tensor:
    """Bucket of each distance n = i - j: exact below half the buckets, logarithmic up to
    max_distance, the last bucket beyond; bidirectional schemes give each sign half the buckets."""
    offset = torch.zeros_like(rel)
    if causal:
        n = rel.clamp_min(0)
    else:
        buckets //= 2
        offset = (rel < 0).long() * buckets
        n = rel.abs()
    exact = buckets // 2
    log_ratio = torch.log(n.float().clamp_min(1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (buckets - exact)).long()).clamp_max(buckets - 1)
    return offset + torch.where(n < exact, n, far)


@POSITION.register("t5", config=T5Config)
class T5Bias(PositionScheme):
    """T5's relative attention bias (Raffel et al., 2020): one learned scalar per head and
    distance bucket, shared by the layers and added to the scores."""

    relative = True
    learns_in_attention = True
    uses_bias = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.table = nn.Embedding(cfg.buckets, self.n_heads)
        nn.init.zeros_(self.table.weight)

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        rel = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
        index = t5_buckets(rel, causal=self.causal, buckets=self.cfg.buckets, max_distance=self.cfg.max_distance)
        return self.table(index).permute(2, 0, 1)[None]  # (1, H, Tq, Tk)
