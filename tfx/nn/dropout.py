"""Dropout (Srivastava et al., 2014) with a cheaper mask on the CPU.

On the CPU, `torch.bernoulli_` draws one random number per element and was 10% of a
translation training step. Here the mask comes from 16-bit slices of random 64-bit integers
(four elements per draw), compared with a threshold: the drop probability is rounded to a
multiple of 2^-16 and the kept values are scaled by the exact inverse of the kept fraction, so
the expectation is unchanged. Elsewhere (CUDA, MPS) `F.dropout` is already fast and is used.
Both draw from torch's global generator, so a checkpointed RNG state resumes exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A boolean mask, True where kept, and the scale 1 / P(kept) to apply to kept values."""
    n = shape.numel()
    drop = round(p * LEVELS)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, (-(-n // 4),), dtype=torch.int64, device=device)
    mask = words.view(torch.int16)[:n].view(shape) >= (drop - LEVELS // 2)
    return mask, LEVELS / (LEVELS - drop)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0 < round(p * LEVELS) < LEVELS:  # off the 2^-16 grid's ends: exact path
        return F.dropout(x, p, training)
    mask, scale = keep_mask(x.shape, p, x.device)
    return torch.where(mask, x * scale, 0.0)


class Dropout(nn.Module):
    """`nn.Dropout` with the fast CPU mask."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
