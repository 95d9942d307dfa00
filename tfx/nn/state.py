"""Decoding state that goes into the stack and comes out of it: nothing hides in modules.

A KV cache is preallocated to its maximum length and written in place by position, so a decode
step allocates no new cache memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
class StackState:
    """Per-layer caches of one stack and the number of positions already consumed.

    A decoder with cross-attention also keeps each layer's projected encoder keys/values
    (`cross`) and the source padding mask, computed once per source.
    """

    layers: list = field(default_factory=list)  # KVCache, or a kernel's own state, per layer
    cross: list[tuple[Tensor, Tensor]] | None = None
    memory_mask: Tensor | None = None  # (B, S) True = a real source token
    tokens: Tensor | None = None  # (B, L) the history, for kernels without a cache (recomputed)
    memory: list[Tensor] | None = None  # Transformer-XL: per layer, (B, M, d_model) inputs of past segments
    compressed: list[Tensor] | None = None  # Compressive Transformer: per layer, (B, Mc, d_model)
    usage: list[Tensor] | None = None  # per layer, (B, M) attention each memory slot received (most_used)
    recall_k: list[Tensor] | None = None  # Memorizing Transformer: the store's (B, Hkv, N, D) keys
    recall_v: list[Tensor] | None = None  # ... and values
    recall_from: list[Tensor] | None = None  # ... and per row (B,) how many of them an earlier document left
    rmt: list[Tensor] | None = None  # Recurrent Memory Transformer: [(B, m, d_model)] memory tokens
    aux_loss: Tensor | None = None  # a training penalty of the last segment (attention reconstruction)

    CARRIED = ("memory", "compressed", "usage", "recall_k", "recall_v", "recall_from", "rmt")  # what a resumed training run must get back

    def carried(self) -> dict:
        """The segment memory as plain CPU tensors, for a checkpoint."""
        return {name: [t.cpu() for t in getattr(self, name)] for name in self.CARRIED if getattr(self, name)}

    @classmethod
    def restore(cls, carried: dict | list, device) -> "StackState":
        if isinstance(carried, list):  # checkpoints before the compressive memory kept only `memory`
            carried = {"memory": carried}
        return cls(**{name: [t.to(device) for t in ts] for name, ts in carried.items()})

    @property
    def length(self) -> int:
        if self.tokens is not None:
            return self.tokens.shape[1]
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        for name in self.CARRIED:
            if getattr(self, name) is not None:
                setattr(self, name, [m.index_select(0, index) for m in getattr(self, name)])
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
        for layer in self.layers:
            layer.reorder(index)
        if self.cross is not None:
            self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)

    def crop(self, length: int) -> None:
        if self.tokens is not None:
            self.tokens = self.tokens[:, :length]
        for layer in self.layers:
            layer.crop(length)
