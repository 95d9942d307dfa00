"""Blockwise attention of BlockBERT (Qiu et al., 2019, "Blockwise Self-Attention for Long Document
Understanding").

The positions are cut into blocks of `block_size` (by default the training context divided into
`n_blocks` blocks), and every n_blocks consecutive blocks form a segment (one training context;
longer sequences repeat the pattern segment by segment). Each head has a permutation of the
blocks of a segment: head h, with shift s_h, lets the queries of block b attend to the keys of
block (b - s_h) mod n_blocks of the same segment only. Shift 0 is the identity (block-diagonal,
local context); other shifts reach the other blocks, so together the heads connect every block
to others. Head h uses shifts[h % len(shifts)]; the default [0, 1] gives half the heads the
identity and half the cyclic shift by one (the paper's 1:1 for n = 2).

Causal use applies causality on top: an identity head is block-causal; a head with shift s > 0
sees the whole s-th earlier block, and the queries of the first s blocks of each segment (whose
permuted block lies ahead) see no key and give zeros.

Computed block-gathered (each query block against its head's key block): time and memory
O(T·block_size) = O(T^2/n_blocks) per head. Causal and bidirectional, KV cache (absolute blocks),
padding, GQA/MQA and an additive bias (read at the gathered pairs). allowed() is (H, Tq, Tk).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.attention.gathered import Part, aligned_blocks, gathered_attention
from tfx.registry import ATTENTION, KindConfig


class BlockwiseConfig(KindConfig):
    kind: str = "blockwise"
    n_blocks: int = Field(2, ge=1, description="blocks per segment (per training context)")
    block_size: int | None = Field(None, ge=1, description="positions per block; default ceil(context / n_blocks)")
    shifts: list[int] = Field([0, 1], min_length=1,
                              description="head h: query block b -> key block (b - shifts[h % len]) mod n_blocks")


@ATTENTION.register("blockwise", config=BlockwiseConfig)
class BlockwiseAttention(AttentionKernel):
    """Each head attends from a block to one block of its segment, given by a per-head cyclic shift."""

    complexity = "O(T^2/n)"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        if cfg.block_size is None and self.max_len <= 0:
            raise ValueError("blockwise attention needs block_size or a context length to divide into n_blocks")
        self.n = cfg.n_blocks
        self.size = cfg.block_size or math.ceil(self.max_len / cfg.n_blocks)
        shifts = [cfg.shifts[h % len(cfg.shifts)] % self.n for h in range(self.n_heads)]
        self.register_buffer("shifts", torch.tensor(shifts), persistent=False)  # (H,)
        self.uniform = len(set(shifts)) == 1  # one key layout serves every head

    def key_block(self, qb: Tensor, shift: Tensor) -> Tensor:
        """The key block that query block qb attends to, for a head's shift (broadcasting)."""
        segment = torch.div(qb, self.n, rounding_mode="floor") * self.n
        return segment + (qb - segment - shift) % self.n

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        qb = torch.div(q_pos, self.size, rounding_mode="floor")[None, :, None]  # (1, Tq, 1)
        kb = torch.div(k_pos, self.size, rounding_mode="floor")[None, None, :]  # (1, 1, Tk)
        return kb == self.key_block(qb, self.shifts.to(q_pos.device)[:, None, None])  # (H, Tq, Tk)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq, s = q.shape[2], self.size
        q_idx, pos = aligned_blocks(Tq, spec.q_pos[0], s)          # (G, s)
        qb = torch.div(pos[:, 0], s, rounding_mode="floor")         # (G,)
        shifts = self.shifts.to(q.device)
        shifts = shifts[:1] if self.uniform else shifts
        kb = self.key_block(qb[None, :], shifts[:, None])           # (P, G)
        k_idx = kb[..., None] * s + torch.arange(s, device=q.device) - spec.k_pos[0]  # (P, G, s)
        part = Part(q_idx.expand(kb.shape[0], -1, -1), k_idx)
        return gathered_attention(q, k, v, spec, [part], dropout=self.dropout if self.training else 0.0)
