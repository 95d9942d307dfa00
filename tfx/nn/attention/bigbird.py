"""BigBird attention (Zaheer et al., 2020, "Big Bird: Transformers for Longer Sequences"), the
ITC form (global tokens taken from the sequence), at block granularity.

Positions are cut into blocks of `block` (absolute: blocks do not move with a cache). Query block
a of head h attends to key block c iff
  window: |a - c| <= (window_blocks - 1) / 2 (its own block and its neighbours), or
  global: a < global_blocks or c < global_blocks (the first blocks attend to all and are seen by
          all), or
  random: c is one of the `random_blocks` blocks R(h, a) drawn for that head and query block.
R(h, a) is drawn, without replacement, from the blocks that are neither global nor in a's window:
with random_from = "all", the blocks of the training context (or up to a, past it); with "past",
the blocks before a's window only (for causal use, where later blocks would be masked). The draw
is a function of (seed, layer, head, a) only, never of the sequence length: a cache, training and
evaluation, the kernel and allowed() all see the same blocks.

Causal use applies causality on top. Computed block-gathered (tfx.nn.attention.gathered): each
query block gathers its window, global and random key blocks (time and memory
O(T·block·(window_blocks + global_blocks + random_blocks))), and the global query blocks attend
to all keys (O(global_blocks·block·T)). Causal and bidirectional, KV cache, padding, GQA/MQA and
an additive bias (read at the gathered pairs). allowed() is (H, Tq, Tk): random blocks differ
between heads. forward() reads the last query position once (a host sync) to size the table of
random blocks.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.attention.gathered import Part, aligned_blocks, gathered_attention
from tfx.registry import ATTENTION, KindConfig


class BigBirdConfig(KindConfig):
    kind: str = "bigbird"
    block: int = Field(32, ge=1, description="positions per block")
    window_blocks: int = Field(3, ge=1, description="odd: the own block and (window_blocks - 1)/2 on each side")
    global_blocks: int = Field(1, ge=0, description="the first blocks, which attend to all and are seen by all")
    random_blocks: int = Field(2, ge=0, description="random key blocks per query block and head")
    random_from: Literal["all", "past"] = Field(
        "all", description="all: any block of the context; past: earlier blocks only (for causal use)")
    seed: int = Field(0, description="fixes the random blocks (with the layer, head and query block)")

    @model_validator(mode="after")
    def _odd_window(self):
        if self.window_blocks % 2 == 0:
            raise ValueError(f"window_blocks must be odd, got {self.window_blocks}")
        return self


@ATTENTION.register("bigbird", config=BigBirdConfig)
class BigBirdAttention(AttentionKernel):
    """Window, global and seeded random key blocks per query block; global blocks see everything."""

    complexity = "O(T·b·(w + g + r))"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.block, self.half, self.n_global = cfg.block, (cfg.window_blocks - 1) // 2, cfg.global_blocks
        self.n_random, self.scope, self.seed = cfg.random_blocks, cfg.random_from, cfg.seed
        self.n_context = math.ceil(self.max_len / self.block) if self.max_len > 0 else 0
        self._table = torch.full((self.n_heads, 0, self.n_random), -1, dtype=torch.long)  # (H, A, r) on CPU
        self._on_device: dict[torch.device, Tensor] = {}

    def candidates(self, a: int) -> list[int]:
        """Blocks that query block a may draw at random: not global, not in its window."""
        hi = a - self.half if self.scope == "past" else max(self.n_context, a + 1)
        return [c for c in range(self.n_global, hi) if abs(a - c) > self.half]

    def random_table(self, n_blocks: int, device: torch.device) -> Tensor:
        """(H, n_blocks', r) random key blocks of query blocks 0.. (at least n_blocks rows); -1 = none."""
        A = self._table.shape[1]
        if A < n_blocks:
            rows = [self._table]
            for a in range(A, max(n_blocks, 2 * A)):
                row = torch.full((self.n_heads, self.n_random), -1, dtype=torch.long)
                cands = torch.tensor(self.candidates(a), dtype=torch.long)
                if a >= self.n_global and self.n_random and len(cands):
                    g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.layer) * 1_000_033 + a) % 2**63)
                    for h in range(self.n_heads):
                        pick = cands[torch.randperm(len(cands), generator=g)[: self.n_random]]
                        row[h, : len(pick)] = pick
                rows.append(row[:, None])
            self._table = torch.cat(rows, dim=1)
            self._on_device.clear()
        if device not in self._on_device:
            self._on_device[device] = self._table.to(device)
        return self._on_device[device]

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        qb = torch.div(q_pos, self.block, rounding_mode="floor")  # (Tq,)
        kb = torch.div(k_pos, self.block, rounding_mode="floor")  # (Tk,)
        table = self.random_table(int(qb.max()) + 1, q_pos.device)
        rand = table[:, qb.clamp_min(0)]                           # (H, Tq, r)
        hit = (rand[..., None] == kb).any(-2)                       # (H, Tq, Tk)
        window = (qb[:, None] - kb[None, :]).abs() <= self.half
        glob = (qb[:, None] < self.n_global) | (kb[None, :] < self.n_global)
        return hit | window | glob

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq, Tk, b, H = q.shape[2], k.shape[2], self.block, q.shape[1]
        q0, k0 = spec.q_pos[0], spec.k_pos[0]
        q_idx, pos = aligned_blocks(Tq, q0, b)                     # (G, b)
        qb = torch.div(pos[:, 0], b, rounding_mode="floor")         # (G,)
        G = qb.shape[0]
        table = self.random_table(int(spec.q_pos[-1]) // b + 2, q.device)  # the groups' blocks and one more
        rand = table[:, qb.clamp_min(0)]                            # (H, G, r)
        window = qb[:, None] + torch.arange(-self.half, self.half + 1, device=q.device)  # (G, w)
        glob = torch.arange(self.n_global, device=q.device).expand(G, -1)                # (G, g)
        glob = torch.where((qb[:, None] - glob).abs() <= self.half, -1, glob)  # already in the window
        blocks = torch.cat([window.expand(H, -1, -1), glob.expand(H, -1, -1), rand], dim=-1)  # (H, G, n)
        keys = blocks[..., None] * b + torch.arange(b, device=q.device) - k0  # (H, G, n, b)
        keys = torch.where(blocks[..., None] >= 0, keys, -1).flatten(2)       # (H, G, n·b)
        parts = [Part(q_idx.expand(H, -1, -1), keys,
                      lambda qp, kp: torch.div(qp, b, rounding_mode="floor") >= self.n_global)]
        if self.n_global:  # the global query blocks against every key
            g_queries = (torch.arange(self.n_global * b, device=q.device) - q0).view(1, 1, -1)
            parts.append(Part(g_queries, torch.arange(Tk, device=q.device).view(1, 1, Tk)))
        return gathered_attention(q, k, v, spec, parts, dropout=self.dropout if self.training else 0.0)
