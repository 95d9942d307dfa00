"""Segment-level memory kinds of `model.memory.kind` (the state lives in StackState.memory).

- `none`: every sequence stands alone.
- `xl`: Transformer-XL recurrence (Dai et al., 2019). Each layer keeps the hidden states that
  entered it over the last `mem_len` positions of the previous segments (gradient stopped); the
  next segment's keys and values are computed from [memory | segment], so a token attends up to
  mem_len + segment positions back. Training reads each batch row as a contiguous stream, so the
  memory carries from step to step; evaluation reads the text as consecutive segments. Generation
  keeps a KV cache of context + mem_len positions, which is the same memory one token at a time.
  Positions must be relative (rope, alibi, xl, t5, shaw, da, none): memory positions precede the
  segment's, and only distances matter.
"""
from __future__ import annotations

from pydantic import Field

from tfx.registry import MEMORY, KindConfig


class NoMemoryConfig(KindConfig):
    kind: str = "none"


class XLMemoryConfig(KindConfig):
    kind: str = "xl"
    mem_len: int = Field(128, gt=0)  # positions kept per layer


MEMORY.register("none", config=NoMemoryConfig)(object)
MEMORY.register("xl", config=XLMemoryConfig)(object)

RELATIVE = ("rope", "alibi", "xl", "t5", "shaw", "da", "none")


def mem_len(cfg) -> int:
    """Positions of memory a stack keeps (0 without memory)."""
    memory = getattr(cfg, "memory", None)
    return getattr(memory, "mem_len", 0) if memory is not None else 0


def memory_problems(recipe) -> list[str]:
    m = recipe.model
    if m.memory.kind == "none":
        return []
    out = []
    if recipe.family != "lm":
        out.append(f"model.memory.kind: {m.memory.kind!r} is for the lm family")
    if m.position.kind not in RELATIVE:
        out.append(f"model.memory.kind: {m.memory.kind!r} needs relative positions ({', '.join(RELATIVE)}); "
                   f"{m.position.kind!r} gives each segment the same absolute positions")
    from tfx.registry import ATTENTION

    if not ATTENTION.get(m.attention.kind).supports_cache:
        out.append(f"model.memory.kind: {m.memory.kind!r} needs keys before the queries, which "
                   f"{m.attention.kind!r} cannot take (it has no cache)")
    return out
