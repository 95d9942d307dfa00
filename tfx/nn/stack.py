"""TransformerStack: token embeddings, a position scheme, blocks and a final norm.

`h, state = stack(tokens, state=..., key_padding_mask=...)`: the state (KV caches) goes in and comes
out; positions continue from the state's length, so a decode step needs no special case.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tfx.nn.attention.base import AttnSpec
from tfx.nn.layers import Attention, Block, FeedForward, default_d_ff, make_norm
from tfx.nn.state import KVCache, StackState
from tfx.registry import ATTENTION, POSITION


class TransformerStack(nn.Module):
    """Embeddings -> position scheme -> N pre-norm blocks -> final norm."""

    def __init__(self, cfg, *, vocab_size: int, causal: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        d_head = cfg.d_head or cfg.d_model // cfg.n_heads
        n_kv = cfg.n_kv_heads or cfg.n_heads
        self.n_kv_heads, self.d_head = n_kv, d_head
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = POSITION.build(cfg.position, d_model=cfg.d_model, d_head=d_head, n_heads=cfg.n_heads,
                                  max_len=cfg.context, causal=causal)
        self.drop = nn.Dropout(cfg.dropout)
        d_ff = cfg.d_ff or default_d_ff(cfg.d_model, cfg.ffn)
        self.blocks = nn.ModuleList(
            Block(
                attn=Attention(
                    d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=n_kv, d_head=d_head, bias=cfg.bias,
                    dropout=cfg.dropout,
                    kernel=ATTENTION.build(cfg.attention, n_heads=cfg.n_heads, d_head=d_head, dropout=cfg.dropout),
                ),
                ffn=FeedForward(d_model=cfg.d_model, d_ff=d_ff, kind=cfg.ffn, bias=cfg.bias, dropout=cfg.dropout),
                norm=cfg.norm, d_model=cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias,
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual output projections scaled by 1/sqrt(2L)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.out, block.ffn.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def new_state(self, batch: int, max_len: int, *, device=None, dtype=None) -> StackState:
        """Empty preallocated KV caches for `batch` rows and up to `max_len` positions."""
        p = self.embed.weight
        return StackState([
            KVCache(batch, self.n_kv_heads, max_len, self.d_head, device=device or p.device, dtype=dtype or p.dtype)
            for _ in self.blocks
        ])

    def forward(self, tokens: Tensor, *, state: StackState | None = None,
                key_padding_mask: Tensor | None = None) -> tuple[Tensor, StackState | None]:
        B, T = tokens.shape
        offset = state.length if state is not None else 0
        q_pos = torch.arange(offset, offset + T, device=tokens.device)  # (T,)
        k_pos = torch.arange(0, offset + T, device=tokens.device) if offset else q_pos  # (Tk,)
        self.pos.ensure(offset + T)
        spec = AttnSpec(q_pos=q_pos, k_pos=k_pos, causal=self.causal, key_padding_mask=key_padding_mask,
                        bias=self.pos.bias(None, q_pos, k_pos))
        x = self.drop(self.pos.embed(self.embed(tokens), q_pos))  # (B, T, d_model)
        caches = state.layers if state is not None else [None] * len(self.blocks)
        for block, cache in zip(self.blocks, caches):
            x = block(x, pos=self.pos, spec=spec, q_pos=q_pos, cache=cache)
        return self.norm(x), state
