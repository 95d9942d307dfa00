"""TransformerStack: token embeddings, a position scheme, blocks and a final norm.

`h, state = stack(tokens, state=..., key_padding_mask=...)`: the state (KV caches) goes in and comes
out; positions continue from the state's length, so a decode step needs no special case. A stack
whose kernel cannot extend a cache exactly (lsh, routing) keeps the tokens instead and recomputes
the whole prefix at each step.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tfx.nn.dropout import Dropout
from tfx.nn.attention.base import AttnSpec
from tfx.nn.layers import Attention, Block, CrossAttention, FeedForward, default_d_ff, make_norm
from tfx.nn.sinks import SinkCache, chunks_for, stream_problems
from tfx.nn.state import StackState
from tfx.registry import ATTENTION, MEMORY, POSITION
import tfx.nn.compressive  # noqa: F401  (registers the compressive memory)
import tfx.nn.memorizing  # noqa: F401  (registers the memorizing memory)
import tfx.nn.rmt  # noqa: F401  (registers the recurrent memory tokens)
import tfx.nn.relative  # noqa: F401  (registers shaw, xl, da, t5)


class TransformerStack(nn.Module):
    """Embeddings -> position scheme -> N pre-norm blocks -> final norm.

    `cross=True` adds cross-attention to an encoder's output in every block (a seq2seq decoder);
    `embed` shares an existing embedding table (tied source/target vocabularies).
    """

    def __init__(self, cfg, *, vocab_size: int, causal: bool, n_layers: int | None = None, cross: bool = False,
                 embed: nn.Embedding | None = None):
        super().__init__()
        self.cfg, self.causal, self.has_cross = cfg, causal, cross
        n_layers = n_layers or cfg.n_layers
        memory = getattr(cfg, "memory", None)
        recurrent = memory is not None and memory.kind != "none" and causal and not cross
        self.recurrence = MEMORY.build(memory if recurrent else MEMORY.config_model("none")(), d_model=cfg.d_model,
                                       n_layers=n_layers, n_heads=cfg.n_heads, context=cfg.context)
        self.mem_len = self.recurrence.mem_len
        self.recurrent = self.recurrence.carries  # a state carried from segment to segment
        d_head = cfg.d_head or cfg.d_model // cfg.n_heads
        n_kv = cfg.n_kv_heads or cfg.n_heads
        self.n_kv_heads, self.d_head, self.n_layers = n_kv, d_head, n_layers
        self.embed = embed if embed is not None else nn.Embedding(vocab_size, cfg.d_model)
        self.pos = POSITION.build(cfg.position, d_model=cfg.d_model, d_head=d_head, n_heads=cfg.n_heads,
                                  max_len=cfg.context + self.recurrence.extra_positions, causal=causal,
                                  n_layers=n_layers)
        self.drop = Dropout(cfg.dropout)
        d_ff = cfg.d_ff or default_d_ff(cfg.d_model, cfg.ffn)
        heads = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=n_kv, d_head=d_head, bias=cfg.bias,
                     dropout=cfg.dropout)

        shared: dict = {}

        def kernel(cfg_kernel, layer):
            return ATTENTION.build(cfg_kernel, n_heads=cfg.n_heads, d_head=d_head, dropout=cfg.attn_dropout,
                                   max_len=cfg.context, layer=layer, shared=shared)

        dense = ATTENTION.config_model("dense")()  # cross-attention: every source token, any kind of self-attn
        self.blocks = nn.ModuleList(
            Block(
                attn=Attention(**heads, kernel=kernel(cfg.attention, i), layer=i),
                ffn=FeedForward(d_model=cfg.d_model, d_ff=d_ff, kind=cfg.ffn, bias=cfg.bias, dropout=cfg.dropout),
                norm=cfg.norm, d_model=cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias,
                cross=CrossAttention(**heads, kernel=kernel(dense, i)) if cross else None,
            )
            for i in range(n_layers)
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
            projections = [block.attn.out, block.ffn.down] + ([block.cross.out] if block.cross is not None else [])
            for proj in projections:
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(len(projections) * self.n_layers))

    @property
    def supports_cache(self) -> bool:
        """Whether generation can extend per-layer caches (else it keeps the tokens and recomputes)."""
        return all(block.attn.kernel.supports_cache for block in self.blocks) and not self.recurrence.wraps

    def new_memory(self) -> StackState:
        """An empty Transformer-XL state: the first segment has no memory, later ones do."""
        return StackState()

    def new_state(self, batch: int, max_len: int, *, device=None, dtype=None) -> StackState:
        """Empty generation state for `batch` rows and up to `max_len` positions: preallocated KV
        caches (or each kernel's own state), or a token history when the kernel has no cache."""
        p = self.embed.weight
        if not self.supports_cache:
            return StackState(tokens=torch.zeros(batch, 0, dtype=torch.long, device=device or p.device))
        return StackState([
            block.attn.kernel.new_cache(batch, self.n_kv_heads, max_len, device=device or p.device,
                                        dtype=dtype or p.dtype)
            for block in self.blocks
        ])

    def new_stream_state(self, batch: int, *, sinks: int, window: int, device=None, dtype=None) -> StackState:
        """A StreamingLLM state (tfx/nn/sinks.py): per layer, a cache of the first `sinks` and the
        last `window` tokens, whose positions are their cache slots."""
        if problems := stream_problems(self):
            raise ValueError("; ".join(problems))
        p = self.embed.weight
        return StackState([SinkCache(batch, self.n_kv_heads, self.d_head, sinks=sinks, window=window,
                                     device=device or p.device, dtype=dtype or p.dtype) for _ in self.blocks])

    def forward(self, tokens: Tensor, *, state: StackState | None = None, key_padding_mask: Tensor | None = None,
                memory: Tensor | None = None, memory_mask: Tensor | None = None,
                cross_state: StackState | None = None,
                wrap: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, StackState | None]:
        """(B, T) tokens -> (B, T, d_model). A cross stack attends to `memory` (B, S, d_model),
        or to the keys/values the state (or `cross_state`) kept from the first call. `wrap` =
        (before, after) (B, m, d_model) embeddings around the tokens' (memory tokens); the output
        then covers them too."""
        if self.recurrence.wraps and wrap is None and not (state is not None and state.tokens is not None):
            return self.recurrence.run(self, tokens, state)  # memory tokens: segment by segment
        if state is not None and state.tokens is not None:  # no cache: run the whole prefix again
            state.tokens = torch.cat([state.tokens, tokens], dim=1)
            T = tokens.shape[1]
            h, _ = self.forward(state.tokens, key_padding_mask=key_padding_mask, memory=memory,
                                memory_mask=memory_mask, cross_state=state)
            return h[:, -T:], state
        B, T = tokens.shape
        sink = state.layers[0] if state is not None and state.layers and isinstance(state.layers[0], SinkCache) \
            else None
        if sink is not None and sink.length + T > sink.capacity and T > 1:  # evicting: a token at a time
            pieces = chunks_for(sink.length, sink.capacity, T)
            outs = [self.forward(tokens[:, a:b], state=state)[0] for a, b in pieces]
            return torch.cat(outs, 1), state
        recurrent = state is not None and self.recurrent and not state.layers  # a segment memory state
        mems = self.recurrence.memories(state) if recurrent else None
        hooks = self.recurrence.hooks(state, tokens) if recurrent else None
        offset = (state.length if state is not None else 0) + (mems[0].shape[1] if mems else 0)
        if sink is not None:  # positions are cache slots, after the eviction this call makes
            offset = sink.start_for(T)
        q_pos = torch.arange(offset, offset + T, device=tokens.device)  # (T,)
        k_pos = torch.arange(0, offset + T, device=tokens.device) if offset else q_pos  # (Tk,)
        if wrap is not None:  # a segment with its memory tokens, at positions from 0
            offset, T = 0, T + 2 * wrap[0].shape[1]
            q_pos = k_pos = torch.arange(T, device=tokens.device)
        self.pos.ensure(offset + T)
        spec = AttnSpec(q_pos=q_pos, k_pos=k_pos, causal=self.causal, key_padding_mask=key_padding_mask,
                        bias=self.pos.bias(q_pos, k_pos))
        x = self.embed(tokens)  # (B, T, d_model)
        if wrap is not None:
            x = torch.cat([wrap[0], x, wrap[1]], 1)
        x = self.drop(self.pos.embed(x, q_pos))
        caches = state.layers if state is not None and state.layers else [None] * len(self.blocks)
        cross_kvs, cross_spec = [None] * len(self.blocks), None
        if self.has_cross:
            kept = state if state is not None else cross_state
            if kept is not None and kept.cross is not None:
                cross_kvs, memory_mask = kept.cross, kept.memory_mask
            else:
                cross_kvs = [block.cross.project_memory(memory) for block in self.blocks]
                if kept is not None:
                    kept.cross, kept.memory_mask = cross_kvs, memory_mask
            S = cross_kvs[0][0].shape[2]
            cross_spec = AttnSpec(q_pos=q_pos, k_pos=torch.arange(S, device=tokens.device), causal=False,
                                  key_padding_mask=memory_mask)
        inputs = []
        for i, (block, cache, kv) in enumerate(zip(self.blocks, caches, cross_kvs)):
            inputs.append(x)
            x = block(x, pos=self.pos, spec=spec, q_pos=q_pos, cache=cache, cross_kv=kv, cross_spec=cross_spec,
                      memory=mems[i] if mems else None, recall=hooks[i] if hooks else None)
        if recurrent:  # the next segment's memory, from the inputs of each layer
            self.recurrence.update(state, inputs, self.blocks)
        return self.norm(x), state
