"""Attention sinks (StreamingLLM, Xiao et al., 2023): a KV cache of the first `sinks` tokens and
the last `window` tokens, for generating and reading far past the training context.

The cache keeps keys before their position scheme is applied; at every step the kept keys get the
positions of their slots in the cache (0 .. sinks + window - 1, with the new tokens last), as the
paper does, so no position ever exceeds the cache size. This needs a relative scheme (rope, alibi,
none, ...). With `sinks = 0` it is a plain sliding-window cache; with a window at least as long as
the text it is ordinary dense attention whose positions grow with the text.

When new tokens would overflow the cache, the oldest window tokens are evicted first. A chunk of
T > 1 tokens is taken whole only while it fits; past that the stack feeds it one token at a time,
so every token sees exactly the sinks and the `window` tokens before it (itself included):
`streamed` is that driver around the stack's single-pass core.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tfx.nn.memory.base import relative_positions
from tfx.nn.state import StackState
from tfx.registry import POSITION


class SinkCache:
    """One layer's raw keys/values: (B, Hkv, sinks + window, D) buffers in position order."""

    keeps_raw_keys = True  # Attention applies the position scheme after the cache, at the slots

    def __init__(self, batch: int, n_kv_heads: int, d_head: int, *, sinks: int, window: int, device, dtype):
        self.sinks, self.window = sinks, window
        self.k = torch.empty(batch, n_kv_heads, sinks + window, d_head, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def start_for(self, T: int) -> int:
        """The cache slot of the first of T new tokens (after any eviction)."""
        if T > self.capacity - self.sinks and self.length + T > self.capacity:
            raise ValueError(f"{T} new tokens overflow a sink cache of window {self.window}; feed fewer at a time")
        return min(self.length, self.capacity - T)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Evict the oldest window tokens as needed, append the (B, Hkv, T, D) new ones, return all kept."""
        start, s = self.start_for(k.shape[2]), self.sinks
        drop = self.length - start
        if drop:
            self.k[:, :, s:start] = self.k[:, :, s + drop:self.length].clone()
            self.v[:, :, s:start] = self.v[:, :, s + drop:self.length].clone()
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)

    def crop(self, length: int) -> None:
        raise ValueError("a sink cache cannot be cropped: evicted tokens are gone")


def chunks_for(length: int, capacity: int, T: int) -> list[tuple[int, int]]:
    """(start, end) pieces of T new tokens for a cache holding `length` of `capacity`: what fits
    in one piece, then single tokens (each of which may evict)."""
    fit = max(0, min(T, capacity - length))
    pieces = [(0, fit)] if fit else []
    return pieces + [(i, i + 1) for i in range(fit, T)]


def sink_of(state: StackState | None) -> SinkCache | None:
    """The first layer's sink cache, when the state streams (else None)."""
    if state is not None and state.layers and isinstance(state.layers[0], SinkCache):
        return state.layers[0]
    return None


def needs_chunks(state: StackState | None, T: int) -> bool:
    """Whether T new tokens overflow the state's sink cache, so must go in pieces."""
    sink = sink_of(state)
    return sink is not None and sink.length + T > sink.capacity and T > 1


def streamed(stack, tokens: Tensor, state: StackState) -> tuple[Tensor, StackState]:
    """(B, T) tokens through a sink-cache state in pieces (chunks_for): what fits, then one at a time."""
    sink = sink_of(state)
    pieces = chunks_for(sink.length, sink.capacity, tokens.shape[1])
    outs = [stack.core(tokens[:, a:b], state)[0] for a, b in pieces]
    return torch.cat(outs, 1), state


def new_stream_state(stack, batch: int, *, sinks: int, window: int, device=None, dtype=None) -> StackState:
    """A StreamingLLM state for `stack`: per layer, a cache of the first `sinks` and the last `window`
    tokens, whose positions are their cache slots."""
    if problems := stream_problems(stack):
        raise ValueError("; ".join(problems))
    p = stack.embed.weight
    return StackState([SinkCache(batch, stack.n_kv_heads, stack.d_head, sinks=sinks, window=window,
                                 device=device or p.device, dtype=dtype or p.dtype) for _ in stack.passes()])


def stream_problems(stack) -> list[str]:
    """Why this stack cannot stream with a sink cache (empty when it can)."""
    from tfx.nn.attention.base import AttentionKernel

    out = []
    kind = stack.cfg.position.kind
    if not POSITION.get(kind).relative:
        out.append(f"attention sinks re-assign positions inside the cache, which needs a relative position "
                   f"scheme ({', '.join(relative_positions())}); this model uses {kind!r}")
    kernel = stack.blocks[0].attn.kernel
    if type(kernel).new_cache is not AttentionKernel.new_cache or not kernel.supports_cache:
        out.append(f"attention sinks keep keys and values in a cache, which {stack.cfg.attention.kind!r} "
                   f"attention does not use")
    if stack.recurrent:
        out.append("attention sinks and a segment memory (model.memory) do not combine")
    if any(block.ffn.local for block in stack.blocks):
        out.append("attention sinks keep no hidden states for the 'dwconv' feed-forward's neighbours")
    return out
