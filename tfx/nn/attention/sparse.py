"""The factorised patterns of the Sparse Transformer (Child et al., 2019, "Generating Long
Sequences with Sparse Transformers"), in their merged form: one softmax over the union of the two
factors' keys (the paper's "merged" head), computed block-gathered (tfx.nn.attention.gathered).

strided (stride l): key j is allowed for query i iff |i - j| < l (the local factor) or
  (i - j) mod l == 0 (the strided factor). Causal use applies causality on top, which gives the
  paper's i - j < l or (i - j) mod l == 0 over j <= i; bidirectional use is the symmetric version.
  Computed as the local band (query blocks of l, key blocks of 2l - 1 or 3l - 2) plus, for each
  residue class modulo l, the class's queries against the class's keys more than l - 1 away.
  Time and memory O(T·(l + T/l)), O(T·sqrt(T)) at l = sqrt(T).

fixed (block l, summary c): key j is allowed for query i iff j is in i's block
  (floor(j/l) == floor(i/l)) or j is a summary position (j mod l >= l - c). Causal use keeps
  j <= i (the paper's unidirectional pattern); bidirectional use sees every summary position of
  the sequence, before and after. Computed as the block-diagonal part (query block against its
  own key block) plus every query against the summary keys of the other blocks.
  Time and memory O(T·(l + c·T/l)).

Positions are absolute (the blocks and residues do not move with a cache). Both take causal and
bidirectional use, a KV cache, padding, GQA/MQA and an additive bias (read at the gathered pairs).
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.attention.gathered import Part, aligned_blocks, banded_index, gathered_attention, offset
from tfx.registry import ATTENTION, KindConfig


class StridedConfig(KindConfig):
    kind: str = "strided"
    stride: int = Field(32, ge=1, description="l: the local band |i - j| < l and every l-th key before (and after)")


class FixedConfig(KindConfig):
    kind: str = "fixed"
    block: int = Field(32, ge=1, description="l: queries see their whole block of l positions")
    summary: int = Field(4, ge=1, description="c: the last c positions of every block are seen by all queries")

    @model_validator(mode="after")
    def _summary_fits(self):
        if self.summary > self.block:
            raise ValueError(f"summary ({self.summary}) must be at most block ({self.block})")
        return self


@ATTENTION.register("strided", config=StridedConfig)
class StridedAttention(AttentionKernel):
    """Sparse Transformer strided pattern: the last l keys and every l-th key, one softmax."""

    complexity = "O(T·(l + T/l))"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.stride = cfg.stride

    def local_rule(self, qp: Tensor, kp: Tensor) -> Tensor:
        return (qp - kp).abs() < self.stride

    def column_rule(self, qp: Tensor, kp: Tensor) -> Tensor:
        delta = qp - kp
        return (delta % self.stride == 0) & (delta.abs() >= self.stride)

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        qp, kp = q_pos[:, None], k_pos[None, :]
        return self.local_rule(qp, kp) | self.column_rule(qp, kp)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq, Tk, l = q.shape[2], k.shape[2], self.stride
        off = offset(spec)
        q_idx, k_idx = banded_index(Tq, off, reach=l, dilation=1, block=max(1, min(l, Tq)), causal=spec.causal)
        local = Part(q_idx[None], k_idx[None], self.local_rule)
        # Residue classes: queries i = r + l·t against the keys j = ((r + off) mod l) + l·u, the keys
        # whose absolute positions are congruent to the queries' modulo l.
        r = torch.arange(l, device=off.device)[:, None]                      # (l, 1)
        cq = r + l * torch.arange(-(-Tq // l), device=off.device)           # (l, ceil(Tq/l))
        ck = (r + off) % l + l * torch.arange(-(-Tk // l), device=off.device)  # (l, ceil(Tk/l))
        columns = Part(torch.where(cq < Tq, cq, Tq)[None], ck[None], self.column_rule)
        return gathered_attention(q, k, v, spec, [local, columns], dropout=self.dropout if self.training else 0.0)


@ATTENTION.register("fixed", config=FixedConfig)
class FixedAttention(AttentionKernel):
    """Sparse Transformer fixed pattern: the query's own block and the summary positions, one softmax."""

    complexity = "O(T·(l + c·T/l))"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.block, self.summary = cfg.block, cfg.summary

    def same_block(self, qp: Tensor, kp: Tensor) -> Tensor:
        return torch.div(qp, self.block, rounding_mode="floor") == torch.div(kp, self.block, rounding_mode="floor")

    def is_summary(self, kp: Tensor) -> Tensor:
        return kp % self.block >= self.block - self.summary

    def other_summary(self, qp: Tensor, kp: Tensor) -> Tensor:
        return self.is_summary(kp) & ~self.same_block(qp, kp)

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        qp, kp = q_pos[:, None], k_pos[None, :]
        return self.same_block(qp, kp) | self.is_summary(kp)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq, Tk, l, c = q.shape[2], k.shape[2], self.block, self.summary
        q0, k0 = spec.q_pos[0], spec.k_pos[0]
        q_idx, pos = aligned_blocks(Tq, q0, l)                  # (G, l): each block's queries and positions
        own = Part(q_idx[None], (pos - k0)[None], self.same_block)
        n = -(-(Tk + l - 1) // l)                               # key blocks that can meet the keys
        first = torch.div(k0, l, rounding_mode="floor") * l
        starts = first + l * torch.arange(n, device=k0.device)[:, None] + (l - c)
        summary = (starts + torch.arange(c, device=k0.device)).reshape(1, 1, n * c) - k0  # (1, 1, n·c)
        every = torch.arange(Tq, device=q0.device).view(1, 1, Tq)  # one group: all queries
        others = Part(every, summary, self.other_summary)
        return gathered_attention(q, k, v, spec, [own, others], dropout=self.dropout if self.training else 0.0)
