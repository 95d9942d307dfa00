"""What every memory kind shares: the `none` kind, the State protocol, and the recipe checks.

A memory kind (`model.memory.kind`) is a module the stack owns (`stack.recurrence`) plus a State
type of its own, which rides in `StackState.memory` from one segment (or training step) to the next:

- `new_state()`: the state before the first segment (None: the kind carries nothing);
- `memories(state)`: per layer, the (B, M, d_model) hidden states whose keys and values precede the
  segment's (or None);
- `hooks(state, tokens)`: per layer, a function (q, k, v, y) -> y the attention output goes through
  (or None);
- `carry(state, inputs, blocks)`: updates `state` for the next segment from the hidden states that
  entered each layer, and returns the segment's auxiliary training loss (or None).
- optional `output(state, h, tokens, embed)`: the (B, T, d_model) last hidden states (after the
  final norm) the head reads, from the stack's (spalm); optional `see_batch(state, batch)`: what the
  kind reads from a training batch besides the tokens (spalm: the rows' stream positions).

The State type itself knows `reorder(index)` (select batch rows), `save()` (named lists of CPU
tensors, for a checkpoint) and `restore(saved, device)`. A kind that reads a segment in pieces of
its own (rmt) sets `wraps` and provides `run(stack, tokens, state)`, a driver around the stack's core.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from torch import Tensor, nn

import tfx.nn.relative  # noqa: F401  (registers every position scheme, for their `relative`)
from tfx.registry import MEMORY, POSITION, KindConfig


@dataclass
class MemoryState:
    """Base of the memory kinds' states: its fields are per-layer lists of (B, ...) tensors or
    single (B, ...) tensors, batch first. `SAVED` maps the checkpoint's names to the fields (the
    names are those older checkpoints used, so their runs still resume)."""

    SAVED: ClassVar[dict[str, str]] = {}
    SINGLE: ClassVar[tuple[str, ...]] = ()  # fields kept as one tensor, saved as a one-item list

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search, evaluation's last lane): row i becomes old row index[i]."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, [t.index_select(0, index) for t in value])
            elif isinstance(value, Tensor):
                setattr(self, f.name, value.index_select(0, index))

    def save(self) -> dict[str, list[Tensor]]:
        """The state as named lists of CPU tensors (empty fields left out), for a checkpoint."""
        out = {}
        for name, attr in self.SAVED.items():
            value = getattr(self, attr)
            if isinstance(value, Tensor):
                value = [value]
            if value:
                out[name] = [t.cpu() for t in value]
        return out

    @classmethod
    def restore(cls, saved: dict, device) -> "MemoryState":
        """The inverse of save(), on `device`."""
        state = cls()
        for name, attr in cls.SAVED.items():
            if name in saved:
                value = [t.to(device) for t in saved[name]]
                setattr(state, attr, value[0] if attr in cls.SINGLE else value)
        return state


class NoMemoryConfig(KindConfig):
    kind: str = "none"


@MEMORY.register("none", config=NoMemoryConfig)
class NoMemory(nn.Module):
    """Every sequence stands alone."""

    needs = "-"
    mem_len = 0
    carries = False
    wraps = False  # adds memory tokens around each segment (rmt)
    extra_positions = 0  # positions beyond the context that a segment can take
    State = None

    def __init__(self, cfg=None, **_):
        super().__init__()

    def new_state(self) -> MemoryState | None:
        return None


def mem_len(cfg) -> int:
    """Positions of (uncompressed) memory a stack keeps (0 without memory)."""
    memory = getattr(cfg, "memory", None)
    return getattr(memory, "mem_len", 0) if memory is not None else 0


def relative_positions() -> list[str]:
    """The position schemes that declare themselves relative (only distances matter)."""
    return [name for name in POSITION.names() if POSITION.get(name).relative]


def memory_problems(recipe) -> list[str]:
    """Why this recipe's memory kind cannot work with the rest of it (empty when it can)."""
    m = recipe.model
    if m.memory.kind == "none":
        return []
    out = list(getattr(MEMORY.get(m.memory.kind), "recipe_problems", lambda cfg: [])(m.memory))  # the kind's own
    if recipe.data.blocks == "random":
        out.append(f"data.blocks: 'random' gives each batch row unrelated text, but {m.memory.kind!r} carries its "
                   f"memory from one segment to the next; use 'lanes' or 'auto'")
    if not mem_len(m):  # no segment positions before the segment's own (a memorizing store alone)
        return out
    if not POSITION.get(m.position.kind).relative:
        out.append(f"model.memory.kind: {m.memory.kind!r} needs relative positions "
                   f"({', '.join(relative_positions())}); "
                   f"{m.position.kind!r} gives each segment the same absolute positions")
    from tfx.registry import ATTENTION

    if not ATTENTION.get(m.attention.kind).supports_cache:
        out.append(f"model.memory.kind: {m.memory.kind!r} needs keys before the queries, which "
                   f"{m.attention.kind!r} cannot take (it has no cache)")
    return out
