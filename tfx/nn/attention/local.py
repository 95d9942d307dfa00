"""Sliding-window (local) attention: the Image Transformer's local 1-D attention (Parmar et al.,
2018) and the sliding window of Longformer (Beltagy et al., 2020).

Pattern, on absolute positions: key j is allowed for query i iff |i - j| < window. Causal use
applies causality on top, leaving 0 <= i - j < window (the query and the window - 1 keys before
it); bidirectional use sees window - 1 keys on each side (2·window - 1 keys).

Computed in blocks (tfx.nn.attention.gathered): queries are cut into blocks of `window`
consecutive positions; a block gathers the keys from window - 1 positions before its first query
to its last query (and window - 1 after it when bidirectional), so no Tq x Tk mask or score
matrix is ever built. Time and memory O(T·window) (about 2·T·window scores causal, 3·T·window
bidirectional). Causal and bidirectional, KV cache (queries at any offset), padding, GQA/MQA and an
additive bias (the given (.., Tq, Tk) bias is read at the gathered pairs only). The adaptive span
option (span.py) is computed at the gathered pairs too, so it costs no T x T tensor either.
"""
from __future__ import annotations

from pydantic import Field
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.attention.gathered import Part, banded_index, gathered_attention, offset
from tfx.nn.attention.span import AdaptiveSpan, SpanOptions
from tfx.registry import ATTENTION


class LocalConfig(SpanOptions):
    kind: str = "local"
    window: int = Field(128, ge=1, description="keys within |i - j| < window (causal: the window keys up to i)")


@ATTENTION.register("local", config=LocalConfig)
class LocalAttention(AttentionKernel):
    """Each query attends to the keys less than `window` positions away, computed block by block."""

    complexity = "O(T·w)"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.window = cfg.window
        self.span = AdaptiveSpan(cfg, self.n_heads) if cfg.adaptive_span else None

    def aux_loss(self) -> Tensor | None:
        return self.span.penalty() if self.span is not None and self.training else None

    def rule(self, qp: Tensor, kp: Tensor) -> Tensor:
        return (qp - kp).abs() < self.window

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return self.rule(q_pos[:, None], k_pos[None, :])

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq = q.shape[2]
        block = max(1, min(self.window, Tq))
        q_idx, k_idx = banded_index(Tq, offset(spec), reach=self.window, dilation=1, block=block,
                                    causal=spec.causal)
        part = Part(q_idx[None], k_idx[None], self.rule,
                    distance_bias=self.span.log_mask if self.span is not None else None)
        return gathered_attention(q, k, v, spec, [part], dropout=self.dropout if self.training else 0.0)
