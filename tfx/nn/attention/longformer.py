"""Longformer attention (Beltagy et al., 2020, "Longformer: The Long-Document Transformer"):
a sliding window, dilated on chosen heads, plus symmetric global attention.

Pattern of head h, with dilation d = dilation[h % len(dilation)], on absolute positions:
  window: |i - j| < window·d and (i - j) mod d == 0 (window - 1 keys on each side, d apart;
          d = 1 is the plain sliding window);
  global: i or j is a global position: one of `global_tokens`, or a multiple of `global_every`
          when it is > 0. Global queries attend to every key and every query attends to the
          global keys.
Causal use applies causality on top: 0 <= i - j < window·d on the window, a global query sees
every earlier key, and a global key is seen by every later query.

Computed block-gathered (tfx.nn.attention.gathered) as three disjoint parts, one softmax: the
window of non-global pairs (queries of one residue class modulo d cut into blocks of `window`,
each against its band of keys), all queries against the global keys, and the global queries
against the other keys. Time and memory O(T·(w + g)) for g global positions (with global_every
g grows as T / global_every). Causal and bidirectional, KV cache, padding, GQA/MQA and an additive
bias (read at the gathered pairs). allowed() is (H, Tq, Tk) when heads have different dilations.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.attention.gathered import Part, banded_index, gathered_attention, offset
from tfx.registry import ATTENTION, KindConfig


class LongformerConfig(KindConfig):
    kind: str = "longformer"
    window: int = Field(64, ge=1, description="keys with |i - j| < window·d (causal: the window keys up to i)")
    dilation: list[int] = Field([1], min_length=1, description="per head (cycled): gap d between window keys")
    global_tokens: list[int] = Field([0], description="absolute positions with global attention")
    global_every: int = Field(0, ge=0, description="if > 0, every position that is a multiple of it is global too")

    @model_validator(mode="after")
    def _check(self):
        if any(d < 1 for d in self.dilation):
            raise ValueError(f"dilations must be >= 1, got {self.dilation}")
        if any(p < 0 for p in self.global_tokens):
            raise ValueError(f"global token positions must be >= 0, got {self.global_tokens}")
        return self


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _multiples(lo: Tensor, count: int, every: int) -> Tensor:
    """The multiples of `every` among the `count` positions from lo (and a few beyond)."""
    start = -torch.div(-lo, every, rounding_mode="floor") * every  # ceil(lo / every) * every
    return start + every * torch.arange(count // every + 1, device=lo.device)


@ATTENTION.register("longformer", config=LongformerConfig)
class LongformerAttention(AttentionKernel):
    """Sliding (optionally dilated) window plus global positions that see and are seen by all."""

    complexity = "O(T·(w + g))"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.window, self.every = cfg.window, cfg.global_every
        self.dilations = [cfg.dilation[h % len(cfg.dilation)] for h in range(self.n_heads)]
        self.register_buffer("dilation", torch.tensor(self.dilations)[:, None, None, None], persistent=False)
        # Listed positions that global_every does not already make global (no duplicate keys).
        listed = sorted({p for p in cfg.global_tokens if not (self.every and p % self.every == 0)})
        self.register_buffer("listed", torch.tensor(listed, dtype=torch.long), persistent=False)

    def is_global(self, p: Tensor) -> Tensor:
        g = (p[..., None] == self.listed.to(p.device)).any(-1)
        return g | (p % self.every == 0) if self.every else g

    def in_window(self, qp: Tensor, kp: Tensor, d: Tensor | int) -> Tensor:
        delta = qp - kp
        return (delta.abs() < self.window * d) & (delta % d == 0)

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        qp, kp = q_pos[:, None], k_pos[None, :]
        d = self.dilations[0] if len(set(self.dilations)) == 1 else self.dilation[:, 0].to(q_pos.device)
        return self.in_window(qp, kp, d) | self.is_global(qp) | self.is_global(kp)  # (Tq, Tk) | (H, Tq, Tk)

    def global_index(self, first: Tensor, count: int) -> Tensor:
        """Indices (relative to position `first`) of the global positions among `count` from it."""
        parts = [self.listed.to(first.device) - first]
        if self.every:
            parts.append(_multiples(first, count, self.every) - first)
        return torch.cat(parts)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq, Tk = q.shape[2], k.shape[2]
        q0, k0, off = spec.q_pos[0], spec.k_pos[0], offset(spec)
        block = max(1, min(self.window, Tq))
        distinct = sorted(set(self.dilations))
        groups = max(d * _ceil(_ceil(Tq, d), block) for d in distinct)  # the most groups of any head
        layouts = {d: banded_index(Tq, off, reach=self.window, dilation=d, block=block, causal=spec.causal,
                                   groups=groups) for d in distinct}
        if len(distinct) == 1:
            q_idx, k_idx = (x[None] for x in layouts[distinct[0]])
            dil: Tensor | int = distinct[0]
        else:
            q_idx = torch.stack([layouts[d][0] for d in self.dilations])  # (H, G, block)
            k_idx = torch.stack([layouts[d][1] for d in self.dilations])  # (H, G, K)
            dil = self.dilation.to(q.device)

        def window_rule(qp: Tensor, kp: Tensor) -> Tensor:
            return self.in_window(qp, kp, dil) & ~self.is_global(qp) & ~self.is_global(kp)

        parts = [Part(q_idx, k_idx, window_rule)]
        g_keys = self.global_index(k0, Tk)
        if g_keys.numel():
            every_query = torch.arange(Tq, device=q.device).view(1, 1, Tq)
            parts.append(Part(every_query, g_keys.view(1, 1, -1)))  # all queries x global keys
            g_queries = self.global_index(q0, Tq)
            every_key = torch.arange(Tk, device=q.device).view(1, 1, Tk)
            parts.append(Part(g_queries.view(1, 1, -1), every_key,  # global queries x other keys
                              lambda qp, kp: ~self.is_global(kp)))
        return gathered_attention(q, k, v, spec, parts, dropout=self.dropout if self.training else 0.0)
