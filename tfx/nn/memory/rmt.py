"""Recurrent Memory Transformer (Bulatov et al., 2022), `model.memory.kind = "rmt"`.

Each segment is read as [memory | segment | memory]: `tokens` memory embeddings before the
segment's tokens, which every token can attend to (reading), and the same embeddings after them,
whose outputs at the last layer become the next segment's memory (writing). The first segment's
memory is learned. A training block of `context` tokens is cut into `segments` segments of
context/segments tokens, and the loss backpropagates through the memory across all of them
(BPTT depth = segments); between blocks (training steps, evaluation windows) the memory is
carried with its gradient stopped. Positions restart at 0 in every segment (any position scheme
works; the scheme sees context/segments + 2·tokens positions). Generation recomputes from the
token history, segment by segment, starting from the learned memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.nn.memory.base import MemoryState
from tfx.nn.state import StackState
from tfx.registry import MEMORY, KindConfig


class RMTConfig(KindConfig):
    kind: str = "rmt"
    tokens: int = Field(8, gt=0)  # memory tokens
    segments: int = Field(2, gt=0)  # segments per training block: backprop runs through all of them


@dataclass
class RMTState(MemoryState):
    """The (B, m, d_model) memory tokens the last segment wrote (None: start from the learned ones)."""

    tokens: Tensor | None = None

    SAVED = {"rmt": "tokens"}
    SINGLE = ("tokens",)


@MEMORY.register("rmt", config=RMTConfig)
class RecurrentMemoryTokens(nn.Module):
    """Recurrent Memory Transformer (Bulatov et al., 2022): memory tokens read before and written
    after each segment, backpropagated through the segments of a training block."""

    needs = "-"
    mem_len, carries, wraps = 0, True, True
    State = RMTState

    def __init__(self, cfg, *, d_model: int, context: int, **_):
        super().__init__()
        self.n_tokens = cfg.tokens
        self.segment = max(1, context // cfg.segments)
        self.extra_positions = 2 * cfg.tokens
        self.init = nn.Parameter(torch.randn(cfg.tokens, d_model) * 0.02)

    def new_state(self) -> RMTState:
        return RMTState()

    def run(self, stack, tokens: Tensor, state: StackState | None) -> tuple[Tensor, StackState]:
        """(B, T) tokens in segments of `segment`, the memory flowing through them with its gradient
        (a driver around the stack's single-pass core)."""
        state = state if state is not None else StackState()
        own = state.memory if state.memory is not None else RMTState()
        m = self.n_tokens
        memory = own.tokens if own.tokens is not None else self.init.expand(tokens.shape[0], -1, -1)
        outs = []
        for a in range(0, tokens.shape[1], self.segment):
            h, _ = stack.core(tokens[:, a:a + self.segment], wrap=(memory, memory))  # (B, m + S + m, d)
            outs.append(h[:, m:-m])
            memory = h[:, -m:]
        own.tokens = memory.detach()
        state.memory = own
        return torch.cat(outs, 1), state
