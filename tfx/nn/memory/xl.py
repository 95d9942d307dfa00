"""Transformer-XL recurrence (Dai et al., 2019), `model.memory.kind = "xl"`.

Each layer keeps the hidden states that entered it over the last `mem_len` positions of the
previous segments (gradient stopped); the next segment's keys and values are computed from
[memory | segment], so a token attends up to mem_len + segment positions back. Training reads each
batch row as a contiguous stream, so the memory carries from step to step; evaluation reads the
text as consecutive segments. Generation keeps a KV cache of context + mem_len positions, which is
the same memory one token at a time. Positions must be relative (a scheme whose `relative` is
True: rope, alibi, xl, t5, shaw, da, none): memory positions precede the segment's, and only
distances matter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.nn.memory.base import MemoryState
from tfx.registry import MEMORY, KindConfig


class XLMemoryConfig(KindConfig):
    kind: str = "xl"
    mem_len: int = Field(128, gt=0)  # positions kept per layer


@dataclass
class XLState(MemoryState):
    """Per layer, the (B, M, d_model) inputs of the last mem_len positions (None before the first segment)."""

    hidden: list[Tensor] | None = None

    SAVED = {"memory": "hidden"}


@MEMORY.register("xl", config=XLMemoryConfig)
class XLMemory(nn.Module):
    """Transformer-XL recurrence (Dai et al., 2019): every layer also attends to the inputs it had
    over the last mem_len positions, gradient stopped."""

    needs = "relative positions, a kernel with a KV cache"
    carries, wraps, extra_positions = True, False, 0
    decodes_by_segments = False  # generation keeps a KV cache of context + mem_len instead
    State = XLState

    def __init__(self, cfg, **_):
        super().__init__()
        self.mem_len = cfg.mem_len

    def new_state(self) -> XLState:
        return self.State()

    def memories(self, state: XLState) -> list[Tensor] | None:
        return state.hidden

    def hooks(self, state: XLState, tokens: Tensor | None = None) -> list | None:
        """Per layer, a function (q, k, v, y) -> y the layer's attention output goes through, or None
        (`tokens`: the segment's (B, T) ids)."""
        return None

    def carry(self, state: XLState, inputs: list[Tensor], blocks) -> Tensor | None:
        """The next segment's memory: the last mem_len of [memory | inputs] of each layer."""
        state.hidden = [self.joined(state, i, h)[:, -self.mem_len:].detach() for i, h in enumerate(inputs)]
        return None

    @staticmethod
    def joined(state: XLState, i: int, h: Tensor) -> Tensor:
        """Layer i's memory followed by the segment's inputs (B, M + T, d)."""
        return torch.cat([state.hidden[i], h], 1) if state.hidden else h
