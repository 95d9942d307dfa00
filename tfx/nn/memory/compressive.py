"""Compressive Transformer memory (Rae et al., 2019), `model.memory.kind = "compressive"`.

Each layer keeps an XL memory of the last `mem_len` inputs and, behind it, a compressed memory of
up to `cmem_len` slots. When a segment pushes inputs out of the memory they are not dropped but
compressed by `rate` (every `rate` old states become one) and appended to the compressed memory,
which is itself a FIFO. The next segment attends to [compressed | memory | segment]; a compressed
slot counts as one position. Compression functions (`compression`):

- `max`, `mean`: max- or mean-pooling over groups of `rate` consecutive states;
- `conv`: a 1-D convolution with kernel and stride `rate` (initialised to mean-pooling), trained
  only by the attention-reconstruction loss: the layer's attention (its weights frozen, no
  positions) over the old states vs. over their compression, from the current segment's queries;
  its mean squared error, times `recon_weight`, joins the training loss. The model's own weights
  get no gradient from it, and the compressor gets none from the language-model loss;
- `most_used`: keeps the 1/rate of the old states that received the most attention while they were
  in memory (content attention of each segment's queries, summed over heads and queries), in order.

Evicted states are compressed in whole groups of `rate`; a remainder waits in the memory, which
may then hold up to rate - 1 states more than mem_len. Generation reads the text by segments as
evaluation does (tfx/decoding/segments.py), so it keeps and uses the compressed memory too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from tfx.nn.memory.xl import XLMemory, XLState
from tfx.registry import MEMORY, KindConfig


class CompressiveConfig(KindConfig):
    kind: str = "compressive"
    mem_len: int = Field(128, gt=0)  # uncompressed positions kept per layer
    cmem_len: int = Field(128, gt=0)  # compressed slots kept per layer
    rate: int = Field(4, gt=0)  # old states per compressed slot
    compression: Literal["max", "mean", "conv", "most_used"] = "conv"
    recon_weight: float = Field(1.0, ge=0)  # weight of the attention-reconstruction loss (conv)


@dataclass
class CompressiveState(XLState):
    """The XL memory (`hidden`) and, per layer, the (B, Mc, d_model) compressed memory behind it;
    with most_used, per layer the (B, M) attention each memory slot has received (`usage`)."""

    compressed: list[Tensor] | None = None
    usage: list[Tensor] | None = None

    SAVED = {"memory": "hidden", "compressed": "compressed", "usage": "usage"}


@MEMORY.register("compressive", config=CompressiveConfig)
class CompressiveMemory(XLMemory):
    """Compressive Transformer (Rae et al., 2019): states leaving the XL memory are compressed
    `rate` to 1 (max, mean, conv or most_used) into a second FIFO of cmem_len slots."""

    State = CompressiveState
    decodes_by_segments = True  # generation: tfx/decoding/segments.py

    def __init__(self, cfg, *, d_model: int, n_layers: int, **_):
        super().__init__(cfg)
        self.cmem_len, self.rate, self.kind, self.recon_weight = cfg.cmem_len, cfg.rate, cfg.compression, cfg.recon_weight
        self.convs = None
        if self.kind == "conv":
            self.convs = nn.ModuleList(nn.Conv1d(d_model, d_model, cfg.rate, stride=cfg.rate) for _ in range(n_layers))
            with torch.no_grad():
                for conv in self.convs:  # start as mean-pooling
                    conv.weight.copy_(torch.eye(d_model)[:, :, None].expand(-1, -1, cfg.rate) / cfg.rate)
                    conv.bias.zero_()

    def memories(self, state: CompressiveState) -> list[Tensor] | None:
        if not state.hidden:
            return None
        if not state.compressed:
            return state.hidden
        return [torch.cat([c, m], 1) for c, m in zip(state.compressed, state.hidden)]

    def compress(self, i: int, old: Tensor, usage: Tensor | None) -> Tensor:
        """(B, N, d) old states, N a multiple of rate -> (B, N / rate, d)."""
        if self.kind == "most_used":
            keep = usage.topk(old.shape[1] // self.rate, dim=1).indices.sort(dim=1).values  # (B, N / rate)
            return old.gather(1, keep[..., None].expand(-1, -1, old.shape[2]))
        x = old.transpose(1, 2)  # (B, d, N)
        if self.kind == "conv":
            return self.convs[i](x).transpose(1, 2)
        pool = F.max_pool1d if self.kind == "max" else F.avg_pool1d
        return pool(x, self.rate, self.rate).transpose(1, 2)

    def carry(self, state: CompressiveState, inputs: list[Tensor], blocks) -> Tensor | None:
        """The next segment's memories; returns the attention-reconstruction loss (conv, training)."""
        memory, compressed, usage, losses = [], [], [], []
        for i, (h, block) in enumerate(zip(inputs, blocks)):
            full = self.joined(state, i, h.detach())  # (B, M + T, d)
            used = None
            if self.kind == "most_used":
                _, probs = block.frozen_attention(h.shape[1], full)  # (B, H, T, M + T)
                used = probs.sum((1, 2))
                if state.usage:
                    used[:, :state.usage[i].shape[1]] += state.usage[i]
            n = max(0, full.shape[1] - self.mem_len) // self.rate * self.rate  # evicted, in whole groups
            old, kept = full[:, :n], full[:, n:]
            memory.append(kept)
            if used is not None:
                usage.append(used[:, n:])
            prev = state.compressed[i] if state.compressed else full[:, :0]
            if n:
                squeezed = self.compress(i, old, used[:, :n] if used is not None else None)
                if self.convs is not None and self.training and self.recon_weight:
                    losses.append(self.reconstruction(block, h.detach(), old, squeezed))
                prev = torch.cat([prev, squeezed.detach()], 1)[:, -self.cmem_len:]
            compressed.append(prev)
        state.hidden, state.compressed = memory, compressed
        state.usage = usage or None
        return self.recon_weight * torch.stack(losses).sum() if losses else None

    @staticmethod
    def reconstruction(block, h: Tensor, old: Tensor, squeezed: Tensor) -> Tensor:
        """Mean squared error between the layer's frozen attention over the old states and over
        their compression, from the segment's queries: gradients reach only the compressor."""
        target, _ = block.frozen_attention(h, old)
        got, _ = block.frozen_attention(h, squeezed)
        return F.mse_loss(got, target.detach())
