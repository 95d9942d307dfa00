"""Memorizing Transformer memory (Wu et al., 2022), `model.memory.kind = "memorizing"`.

One attention layer near the top (`layer`, negative counts from the top) also reads an external
store of the (key, value) heads of earlier segments of the same stream, kept per batch row and key
head, at most `size` pairs (FIFO: the oldest go first). Each query retrieves its `top_k` best keys
by dot product (exact top-k over the store), attends softmax(q·k/√D) over them, and the result is
mixed with the layer's own attention through a learned per-head gate g = sigmoid(b_h):
y = g·y_memory + (1 − g)·y_local. Stored keys are taken before any position scheme (memory has no
positions) and with gradients stopped; a segment's pairs enter the store after its own queries
have read it. The store starts empty with every new stream (each epoch of training, each lane of
a recurrent evaluation), and it forgets a document when the next one starts: a stream reads
documents as [bos] + text, so from a `doc_token` (tfx tokenizers' BOS, id 1) on, a query reads no
pair stored before it, and those pairs leave the readable part of the store (`first` counts
them per row until FIFO eviction drops them).
`mem_len` > 0 adds a Transformer-XL memory to every layer as well, as in the paper.

Generation reads the text by segments as evaluation does (tfx/decoding/segments.py): the store is
filled from the prompt and from what is generated, and each token's logits equal evaluation's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.nn.memory.xl import XLMemory, XLState
from tfx.registry import MEMORY, KindConfig


class MemorizingConfig(KindConfig):
    kind: str = "memorizing"
    mem_len: int = Field(0, ge=0)  # an XL memory in every layer as well (0: none)
    layer: int = -2  # the kNN-augmented layer; negative counts from the top
    size: int = Field(4096, gt=0)  # (key, value) pairs kept per row and key head
    top_k: int = Field(32, gt=0)  # keys retrieved per query
    # the token that starts a document (BOS): the store forgets what came before it; -1: never
    doc_token: int = Field(1, ge=-1)


def knn_attention(q: Tensor, keys: Tensor, values: Tensor, top_k: int, readable: Tensor | None = None) -> Tensor:
    """q (B, H, T, D) over a store (B, Hkv, N, D): softmax attention over each query's top_k keys;
    `readable` (B, 1, T, N) bool hides the False pairs from the query (a query that can read none
    gets an arbitrary finite answer, for the caller to discard)."""
    B, H, T, D = q.shape
    keys, values = (t.repeat_interleave(H // t.shape[1], 1) for t in (keys, values))  # (B, H, N, D)
    scores = q @ keys.transpose(-1, -2) * D ** -0.5  # (B, H, T, N)
    if readable is not None:  # finite, so a query with nothing to read stays free of nan (and of nan gradients)
        scores = scores.masked_fill(~readable, torch.finfo(scores.dtype).min)
    best, index = scores.topk(min(top_k, keys.shape[2]), dim=-1)  # (B, H, T, k)
    k = index.shape[-1]
    picked = values.gather(2, index.reshape(B, H, T * k, 1).expand(-1, -1, -1, D)).view(B, H, T, k, D)
    return (best.softmax(-1)[..., None, :] @ picked).squeeze(-2)  # (B, H, T, D)


@dataclass
class MemorizingState(XLState):
    """The XL memory (`hidden`, with mem_len > 0) and the kNN layer's store: (B, Hkv, N, D) keys
    and values, and per row (B,) how many of them an earlier document left (unreadable)."""

    keys: Tensor | None = None
    values: Tensor | None = None
    first: Tensor | None = None

    SAVED = {"memory": "hidden", "recall_k": "keys", "recall_v": "values", "recall_from": "first"}
    SINGLE = ("keys", "values", "first")


@MEMORY.register("memorizing", config=MemorizingConfig)
class MemorizingMemory(XLMemory):
    """Memorizing Transformer (Wu et al., 2022): one layer retrieves the top-k (key, value) heads
    of earlier segments of its stream and gates them with its own attention."""

    needs = "with mem_len > 0: relative positions, a kernel with a KV cache"
    State = MemorizingState
    decodes_by_segments = True  # generation: tfx/decoding/segments.py

    def __init__(self, cfg, *, n_layers: int, n_heads: int, **_):
        super().__init__(cfg)
        self.layer, self.n_layers = cfg.layer % n_layers, n_layers
        self.size, self.top_k = cfg.size, cfg.top_k
        self.doc_token = cfg.doc_token if cfg.doc_token >= 0 else None
        self.gate = nn.Parameter(torch.zeros(n_heads))  # per-head bias b_h; g = sigmoid(b_h) starts at 1/2

    def memories(self, state: MemorizingState) -> list[Tensor] | None:
        return state.hidden if self.mem_len else None

    def carry(self, state: MemorizingState, inputs: list[Tensor], blocks) -> None:
        """The XL memory moves on here; the store has taken the segment's pairs in `recall`."""
        if self.mem_len:
            super().carry(state, inputs, blocks)

    def hooks(self, state: MemorizingState, tokens: Tensor | None = None) -> list:
        out: list = [None] * self.n_layers
        out[self.layer] = lambda q, k, v, y: self.recall(state, q, k, v, y, tokens)
        return out

    def recall(self, state: MemorizingState, q: Tensor, k: Tensor, v: Tensor, y: Tensor, tokens: Tensor | None = None) -> Tensor:
        """The gated mix of y (B, H, T, D) and the store's answer to q; then the segment's k, v
        (B, Hkv, T, D) join the store. With `tokens` (B, T), a document start hides the pairs
        stored before it from its own query and every later one."""
        B, _, T, _ = q.shape
        starts = tokens == self.doc_token if tokens is not None and self.doc_token is not None else None  # (B, T)
        old = state.keys.shape[2] if state.keys is not None else 0
        first = state.first if state.first is not None else torch.zeros(B, dtype=torch.long, device=q.device)
        if old:
            keys, values = state.keys, state.values
            readable = torch.arange(old, device=q.device)[None, :] >= first[:, None]  # (B, N): this document's
            if starts is not None:  # (B, 1, T, N): and only before a new document starts in the segment
                readable = readable[:, None, None, :] & (starts.cumsum(-1) == 0)[:, None, :, None]
            else:
                readable = readable[:, None, None, :].expand(B, 1, T, old)
            g = torch.sigmoid(self.gate).to(y.dtype)[None, :, None, None]
            mixed = g * knn_attention(q, keys.to(q.dtype), values.to(q.dtype), self.top_k, readable) + (1 - g) * y
            y = torch.where(readable.any(-1, keepdim=True), mixed, y)  # a query with nothing to read keeps y
            k, v = torch.cat([keys, k.detach()], 2), torch.cat([values, v.detach()], 2)
        if starts is not None:  # the pairs before the segment's last document start are forgotten
            at = torch.arange(1, T + 1, device=q.device)
            last = (starts * at).amax(-1)  # (B,): 1 + the index of the last start, 0 for none
            first = torch.where(last > 0, old + last - 1, first)
        drop = max(0, old + T - self.size)
        state.keys, state.values = k.detach()[:, :, -self.size:], v.detach()[:, :, -self.size:]
        state.first = (first - drop).clamp(min=0)
        return y
