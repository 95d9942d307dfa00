"""`train.freeze`: parameters kept at their starting values (fine-tuning from `init_from`).

Each entry is a parameter name or a prefix of names as the model's state_dict spells them
(`stack.blocks.0`, `head`), or a shorthand: `embeddings` (every parameter whose name has `embed`,
the token embedding and a learned position table; with tied embeddings that is the output head
too) and `blocks:N` (the lowest N blocks of every stack). Frozen parameters get no gradient, so
the optimizer neither moves nor decays them.
"""
from __future__ import annotations

import re

from torch import nn

from tfx.errors import UsageError


def matches(name: str, pattern: str) -> bool:
    if pattern == "embeddings":
        return "embed" in name
    if m := re.fullmatch(r"blocks:(\d+)", pattern):
        found = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
        return found is not None and int(found.group(1)) < int(m.group(1))
    return name == pattern or name.startswith(pattern + ".")


def freeze(model: nn.Module, patterns: list[str]) -> tuple[int, int]:
    """Stop the gradient of every parameter a pattern names; (tensors, parameters) frozen. A pattern
    that names nothing is an error that lists the model's top-level parts."""
    if not patterns:
        return 0, 0
    named = list(model.named_parameters())
    for pattern in patterns:
        if not any(matches(name, pattern) for name, _ in named):
            parts = sorted({name.split(".")[0] for name, _ in named})
            raise UsageError(f"train.freeze: {pattern!r} names no parameter of this model (a name or prefix such "
                             f"as {', '.join(parts)}, 'stack.blocks.0'; or 'embeddings', 'blocks:N')")
    tensors = params = 0
    for name, p in named:
        if any(matches(name, pattern) for pattern in patterns):
            p.requires_grad_(False)
            tensors, params = tensors + 1, params + p.numel()
    return tensors, params
