"""Segment-level memory kinds of `model.memory.kind`; the state lives in StackState.

- `none`: every sequence stands alone.
- `xl`: Transformer-XL recurrence (Dai et al., 2019). Each layer keeps the hidden states that
  entered it over the last `mem_len` positions of the previous segments (gradient stopped); the
  next segment's keys and values are computed from [memory | segment], so a token attends up to
  mem_len + segment positions back. Training reads each batch row as a contiguous stream, so the
  memory carries from step to step; evaluation reads the text as consecutive segments. Generation
  keeps a KV cache of context + mem_len positions, which is the same memory one token at a time.
  Positions must be relative (rope, alibi, xl, t5, shaw, da, none): memory positions precede the
  segment's, and only distances matter.
- `compressive` (tfx/nn/compressive.py) adds a compressed memory behind the XL one.

A memory kind is a module the stack owns: `memories(state)` gives each layer's memory for the next
segment (or None), `update(state, inputs, blocks)` writes the next state from the hidden states that
entered each layer.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.registry import MEMORY, KindConfig


class NoMemoryConfig(KindConfig):
    kind: str = "none"


class XLMemoryConfig(KindConfig):
    kind: str = "xl"
    mem_len: int = Field(128, gt=0)  # positions kept per layer


@MEMORY.register("none", config=NoMemoryConfig)
class NoMemory(nn.Module):
    """Every sequence stands alone."""

    needs = "-"
    mem_len = 0
    carries = False
    wraps = False  # adds memory tokens around each segment (rmt)
    extra_positions = 0  # positions beyond the context that a segment can take

    def __init__(self, cfg=None, **_):
        super().__init__()


@MEMORY.register("xl", config=XLMemoryConfig)
class XLMemory(nn.Module):
    """Transformer-XL recurrence (Dai et al., 2019): every layer also attends to the inputs it had
    over the last mem_len positions, gradient stopped."""

    needs = "relative positions, a kernel with a KV cache"
    carries, wraps, extra_positions = True, False, 0

    def __init__(self, cfg, **_):
        super().__init__()
        self.mem_len = cfg.mem_len

    def memories(self, state) -> list[Tensor] | None:
        return state.memory

    def hooks(self, state, tokens: Tensor | None = None) -> list | None:
        """Per layer, a function (q, k, v, y) -> y the layer's attention output goes through, or None
        (`tokens`: the segment's (B, T) ids)."""
        return None

    def update(self, state, inputs: list[Tensor], blocks) -> None:
        state.memory = [self.joined(state, i, h)[:, -self.mem_len:].detach() for i, h in enumerate(inputs)]

    @staticmethod
    def joined(state, i: int, h: Tensor) -> Tensor:
        """Layer i's memory followed by the segment's inputs (B, M + T, d)."""
        return torch.cat([state.memory[i], h], 1) if state.memory else h


RELATIVE = ("rope", "alibi", "xl", "t5", "shaw", "da", "none")


def mem_len(cfg) -> int:
    """Positions of (uncompressed) memory a stack keeps (0 without memory)."""
    memory = getattr(cfg, "memory", None)
    return getattr(memory, "mem_len", 0) if memory is not None else 0


def memory_problems(recipe) -> list[str]:
    m = recipe.model
    if m.memory.kind == "none":
        return []
    out = []
    if recipe.data.blocks == "random":
        out.append(f"data.blocks: 'random' gives each batch row unrelated text, but {m.memory.kind!r} carries its "
                   f"memory from one segment to the next; use 'lanes' or 'auto'")
    if recipe.family != "lm":
        out.append(f"model.memory.kind: {m.memory.kind!r} is for the lm family")
    if not mem_len(m):  # no segment positions before the segment's own (a memorizing store alone)
        return out
    if m.position.kind not in RELATIVE:
        out.append(f"model.memory.kind: {m.memory.kind!r} needs relative positions ({', '.join(RELATIVE)}); "
                   f"{m.position.kind!r} gives each segment the same absolute positions")
    from tfx.registry import ATTENTION

    if not ATTENTION.get(m.attention.kind).supports_cache:
        out.append(f"model.memory.kind: {m.memory.kind!r} needs keys before the queries, which "
                   f"{m.attention.kind!r} cannot take (it has no cache)")
    return out
