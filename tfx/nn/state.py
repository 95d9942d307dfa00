"""Decoding state that goes into the stack and comes out of it: nothing hides in modules.

A KV cache is preallocated to its maximum length and written in place by position, so a decode
step allocates no new cache memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class KVCache:
    """Keys and values of one layer: (B, Hkv, max_len, D) buffers and the filled length."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, d_head: int, *, device, dtype):
        self.k = torch.empty(batch, n_kv_heads, max_len, d_head, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new (B, Hkv, T, D) keys/values at the end; return every cached key/value."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget everything past `length` tokens."""
        self.length = min(self.length, length)


@dataclass
class CrossKV:
    """A cross stack's view of the source: each layer's projected encoder keys and values
    (B, Hkv, S, D), computed once per source, and the (B, S) source mask (True = a real token)."""

    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        self.kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)


@dataclass
class StackState:
    """What goes into a stack and comes out of it, and nothing that only one memory kind needs.

    - `layers`: per layer, a KVCache, a sink cache or a kernel's own state (empty: no cache);
    - `cross`: a cross stack's projected source (CrossKV), kept from the first call;
    - `memory`: the memory kind's own state (tfx/nn/memory: XLState, RMTState, ...), carried from
      segment to segment; None without one;
    - `tokens`: (B, L) the history, for kernels without a cache (the stack recomputes the prefix);
    - `aux_loss`: a training penalty of the last segment (the memory kind's, e.g. attention
      reconstruction).
    """

    layers: list = field(default_factory=list)
    cross: CrossKV | None = None
    memory: Any = None
    tokens: Tensor | None = None
    aux_loss: Tensor | None = None

    @property
    def length(self) -> int:
        if self.tokens is not None:
            return self.tokens.shape[1]
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]."""
        if self.memory is not None:
            self.memory.reorder(index)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
        for layer in self.layers:
            layer.reorder(index)
        if self.cross is not None:
            self.cross.reorder(index)

    def crop(self, length: int) -> None:
        if self.tokens is not None:
            self.tokens = self.tokens[:, :length]
        for layer in self.layers:
            layer.crop(length)
