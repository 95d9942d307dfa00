"""TransformerStack: token embeddings, a position scheme, blocks and a final norm.

`h, state = stack(tokens, state=..., key_padding_mask=...)`: the state (KV caches) goes in and comes
out; positions continue from the state's length, so a decode step needs no special case.
`core` is the one pass over the blocks; `forward` picks the driver around it:

- a stack whose kernel cannot extend a cache exactly (lsh, routing) keeps the tokens instead and
  recomputes the whole prefix at each step (`recompute`, below);
- memory tokens (rmt) read a block segment by segment (tfx/nn/memory/rmt.py);
- a sink cache takes what overflows it a token at a time (tfx/nn/memory/sinks.py).

`set_activation_checkpointing` (`train.activation_checkpointing`) makes `core` keep only each block's
input while training and run the block again in the backward pass (`run_block`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tfx.errors import UsageError
from tfx.nn import reversible as rev
from tfx.nn.depth import UniversalDepth
from tfx.nn.dropout import Dropout
from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.layers import Attention, Block, CrossAttention, FeedForward, default_d_ff, make_norm
from tfx.nn.memory import sinks as streaming
from tfx.nn.regularisers import SPECIAL_IDS, WordDropout
from tfx.nn.simplified import ShapedAttention, SimplifiedBlock
from tfx.nn.state import CrossKV, StackState
from tfx.registry import ATTENTION, MEMORY, POSITION
import tfx.nn.relative  # noqa: F401  (registers shaw, xl, da, t5)


class TransformerStack(nn.Module):
    """Embeddings -> position scheme -> N blocks -> final norm.

    The blocks are pre-norm (`model.norm_position = "pre"`), post-norm ("post": no final norm then),
    or He & Hofmann's simplified ones (`model.block = "simplified"`, tfx/nn/simplified.py); applied
    once each, or as one shared step repeated with halting (`[model.depth]`, tfx/nn/depth.py), or as
    reversible couplings of two streams (`model.reversible`, tfx/nn/reversible.py).

    `cross=True` adds cross-attention to an encoder's output in every block (a seq2seq decoder);
    `embed` shares an existing embedding table (tied source/target vocabularies); `word_dropout`
    drops input tokens while training, never those in `keep_ids` (tfx/nn/regularisers.py).
    Images (the vit family): `vocab_size=0` builds no token table (the model passes `embeds`, its
    patch embeddings, to `forward`), and `grid` is the training images' (rows, cols, prefix) grid.
    """

    def __init__(self, cfg, *, vocab_size: int, causal: bool, n_layers: int | None = None, cross: bool = False,
                 embed: nn.Embedding | None = None, word_dropout: float = 0.0,
                 keep_ids: tuple[int, ...] = SPECIAL_IDS, grid: tuple[int, int, int] | None = None):
        super().__init__()
        self.cfg, self.causal, self.has_cross = cfg, causal, cross
        n_layers = n_layers or cfg.n_layers
        memory = getattr(cfg, "memory", None)
        recurrent = memory is not None and memory.kind != "none" and causal and not cross
        # The memory kind's module is built first and named `recurrence`: the parameter order (so the
        # random init and the optimizer's state) and the state_dict keys of saved runs depend on it.
        self.recurrence = MEMORY.build(memory if recurrent else MEMORY.config_model("none")(), d_model=cfg.d_model,
                                       n_layers=n_layers, n_heads=cfg.n_heads, context=cfg.context)
        self.mem_len = self.recurrence.mem_len
        self.recurrent = self.recurrence.carries  # a state carried from segment to segment
        d_head = cfg.d_head or cfg.d_model // cfg.n_heads
        n_kv = cfg.n_kv_heads or cfg.n_heads
        self.n_kv_heads, self.d_head, self.n_layers = n_kv, d_head, n_layers
        self.embed = embed if embed is not None else nn.Embedding(vocab_size, cfg.d_model) if vocab_size else None
        self.pos = POSITION.build(cfg.position, d_model=cfg.d_model, d_head=d_head, n_heads=cfg.n_heads,
                                  max_len=cfg.context + self.recurrence.extra_positions, causal=causal,
                                  n_layers=n_layers, **({"grid": grid} if grid is not None else {}))
        self.drop = Dropout(cfg.dropout)
        self.embed_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias) \
            if getattr(cfg, "embed_norm", False) else None  # BERT's norm over the embeddings
        self.word_drop = WordDropout(word_dropout, keep_ids)  # no parameters: the state_dict is unchanged
        d_ff = cfg.d_ff or default_d_ff(cfg.d_model, cfg.ffn)
        heads = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=n_kv, d_head=d_head, bias=cfg.bias,
                     dropout=cfg.dropout)

        shared: dict = {}

        def kernel(cfg_kernel, layer):
            return ATTENTION.build(cfg_kernel, n_heads=cfg.n_heads, d_head=d_head, dropout=cfg.attn_dropout,
                                   max_len=cfg.context, layer=layer, shared=shared)

        dense = ATTENTION.config_model("dense")()  # cross-attention: every source token, any kind of self-attn
        norms = dict(norm=cfg.norm, d_model=cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        simplified = getattr(cfg, "block", "standard") == "simplified"
        post = getattr(cfg, "norm_position", "pre") == "post"

        def block(i: int) -> nn.Module:  # built in this order: the kernels' and layers' random draws depend on it
            attn = ShapedAttention(d_model=cfg.d_model, n_heads=cfg.n_heads, bias=cfg.bias,
                                   kernel=kernel(layer_attention(cfg, i), i), layer=i) if simplified else \
                Attention(**heads, kernel=kernel(layer_attention(cfg, i), i), layer=i)
            ffn = FeedForward(d_model=cfg.d_model, d_ff=d_ff, kind=cfg.ffn, bias=cfg.bias, dropout=cfg.dropout,
                              two_d=grid is not None, chunks=getattr(cfg, "ffn_chunks", 1))
            if simplified:
                return SimplifiedBlock(attn=attn, ffn=ffn, **norms)
            return Block(attn=attn, ffn=ffn, **norms, cross=CrossAttention(**heads, kernel=kernel(dense, i)) if cross
                         else None, post=post)

        self.blocks = nn.ModuleList(block(i) for i in range(n_layers))
        # post-norm blocks end in a norm already (the original Transformer has no final one)
        self.norm = nn.Identity() if post else make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        depth = getattr(cfg, "depth", None)
        self.depth = UniversalDepth(depth, cfg.d_model) if depth is not None and depth.kind == "universal" else None
        self.reversible = getattr(cfg, "reversible", False)
        if self.reversible and (problems := checkpointing_problems([self])):
            raise UsageError("model.reversible recomputes each sublayer in the backward pass: " + "; ".join(problems))
        self.activation_checkpointing = False  # set_activation_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual output projections scaled by 1/sqrt(2L)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            if isinstance(block, SimplifiedBlock):  # no output projection; zero queries, unit gains
                block.attn.reset_parameters()
                projections = [block.ffn.down]
            else:
                projections = [block.attn.out, block.ffn.down] + ([block.cross.out] if block.cross is not None else [])
            for proj in projections:
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(len(projections) * self.n_layers))
        if self.depth is not None:
            self.depth.reset_parameters()

    def passes(self) -> list[Block]:
        """The blocks in the order they run: each once, or (universal depth) the shared ones max_steps
        times; generation keeps one cache per pass."""
        return list(self.blocks) * (self.depth.max_steps if self.depth is not None else 1)

    @property
    def supports_cache(self) -> bool:
        """Whether generation can extend per-layer caches (else it keeps the tokens and recomputes)."""
        return (all(block.attn.kernel.supports_cache and not block.ffn.local for block in self.blocks)
                and not self.recurrence.wraps)

    def new_memory(self) -> StackState:
        """An empty segment-memory state: the first segment has no memory, later ones do."""
        return StackState(memory=self.recurrence.new_state())

    def restore_memory(self, saved: dict | list, device) -> StackState:
        """A segment-memory state from a checkpoint's `save()` (a plain list: older runs' XL memory)."""
        if isinstance(saved, list):
            saved = {"memory": saved}
        return StackState(memory=self.recurrence.State.restore(saved, device))

    def new_state(self, batch: int, max_len: int, *, device=None, dtype=None) -> StackState:
        """Empty generation state for `batch` rows and up to `max_len` positions: preallocated KV
        caches (or each kernel's own state), or a token history when the kernel has no cache."""
        p = self.embed.weight if self.embed is not None else next(self.parameters())
        if not self.supports_cache:
            return StackState(tokens=torch.zeros(batch, 0, dtype=torch.long, device=device or p.device))
        return StackState([
            block.attn.kernel.new_cache(batch, self.n_kv_heads, max_len, device=device or p.device,
                                        dtype=dtype or p.dtype)
            for block in self.passes()
        ])

    def new_stream_state(self, batch: int, *, sinks: int, window: int, device=None, dtype=None) -> StackState:
        """A StreamingLLM state (tfx/nn/memory/sinks.py)."""
        return streaming.new_stream_state(self, batch, sinks=sinks, window=window, device=device, dtype=dtype)

    def forward(self, tokens: Tensor | None, *, state: StackState | None = None, key_padding_mask: Tensor | None = None,
                source: Tensor | None = None, source_mask: Tensor | None = None, embeds: Tensor | None = None,
                grid: tuple[int, int, int] | None = None, outputs: list | None = None) -> tuple[Tensor, StackState | None]:
        """(B, T) tokens -> (B, T, d_model), through the driver the state and memory kind need;
        images give `embeds` (B, T, d_model) instead of tokens, and their `grid` (AttnSpec.grid);
        `outputs` gets each layer's output (the plain driver only: `core`)."""
        if embeds is not None:
            return self.core(None, state, key_padding_mask=key_padding_mask, embeds=embeds, grid=grid)
        if state is not None and state.tokens is not None:
            return recompute(self, tokens, state, key_padding_mask, source, source_mask)
        if self.recurrence.wraps:
            return self.recurrence.run(self, tokens, state)
        if streaming.needs_chunks(state, tokens.shape[1]):
            return streaming.streamed(self, tokens, state)
        return self.core(tokens, state, key_padding_mask=key_padding_mask, source=source, source_mask=source_mask,
                         outputs=outputs)

    def core(self, tokens: Tensor, state: StackState | None = None, *, key_padding_mask: Tensor | None = None,
             source: Tensor | None = None, source_mask: Tensor | None = None,
             wrap: tuple[Tensor, Tensor] | None = None, embeds: Tensor | None = None,
             grid: tuple[int, int, int] | None = None,
             outputs: list | None = None) -> tuple[Tensor, StackState | None]:
        """One pass: (B, T) tokens -> (B, T, d_model). A cross stack attends to `source` (B, S, d_model)
        or to the keys/values the state kept from the first call; a memory state gives each layer its
        memory and takes the next. `wrap` = (before, after) (B, m, d_model) embeddings around the
        tokens (memory tokens); the output then covers them too. `embeds` (B, T, d_model) replace the
        tokens' embeddings (images), on the (rows, cols, prefix) `grid` they give. `outputs`, a
        list, gets each layer's output in turn (CALM's exits; the blocks applied once each)."""
        memory = state.memory if state is not None else None
        mems = self.recurrence.memories(memory) if memory is not None else None
        x, kw, caches, cross_kvs = self.enter(tokens, state, mems, key_padding_mask=key_padding_mask, source=source,
                                              source_mask=source_mask, wrap=wrap, embeds=embeds, grid=grid)
        if self.depth is not None:
            return self.norm(self.universal(x, caches, cross_kvs, key_padding_mask, **kw, memory=None,
                                            recall=None)), state
        if self.reversible:
            layers = rev.sublayers(self.blocks, caches, cross_kvs, **kw)
            grad = self.training and torch.is_grad_enabled()
            return self.norm(rev.reversible(x, layers) if grad else rev.couple(x, layers)), state
        hooks = self.recurrence.hooks(memory, tokens) if memory is not None else None
        inputs = []
        for i, (block, cache, kv) in enumerate(zip(self.blocks, caches, cross_kvs)):
            inputs.append(x)
            x = self.run_block(block, x, **kw, cache=cache, cross_kv=kv, memory=mems[i] if mems else None,
                               recall=hooks[i] if hooks else None)
            if outputs is not None:
                outputs.append(x)
        if memory is not None:  # the next segment's memory, from the inputs of each layer
            state.aux_loss = self.recurrence.carry(memory, inputs, self.blocks)
            if hasattr(self.recurrence, "output"):  # a kind that acts on the last hidden states (spalm)
                return self.recurrence.output(memory, self.norm(x), tokens, self.embed), state
        return self.norm(x), state

    def enter(self, tokens: Tensor | None, state: StackState | None, mems: list[Tensor] | None = None, *,
              key_padding_mask: Tensor | None = None, source: Tensor | None = None, source_mask: Tensor | None = None,
              wrap: tuple[Tensor, Tensor] | None = None, embeds: Tensor | None = None,
              grid: tuple[int, int, int] | None = None) -> tuple[Tensor, dict, list, list]:
        """What a pass over the blocks starts from: the first block's input x (B, T, d_model), the
        keywords every block takes (pos, spec, q_pos, cross_spec), each pass's cache and each layer's
        cross keys/values (see `core` for the arguments)."""
        q_pos, k_pos, end = self.positions(tokens if embeds is None else embeds, state, mems, wrap)
        self.pos.use_grid(grid)
        self.pos.ensure(end)
        spec = AttnSpec(q_pos=q_pos, k_pos=k_pos, causal=self.causal, key_padding_mask=key_padding_mask,
                        bias=self.pos.bias(q_pos, k_pos), grid=grid)
        x = self.word_drop(self.embed(tokens), tokens) if embeds is None else embeds  # (B, T, d_model)
        if wrap is not None:
            x = torch.cat([wrap[0], x, wrap[1]], 1)  # (B, m + T + m, d_model)
        x = self.pos.embed(x, q_pos)
        x = self.drop(self.embed_norm(x) if self.embed_norm is not None else x)
        caches = state.layers if state is not None and state.layers else [None] * len(self.passes())
        cross_kvs, cross_spec = self.cross_inputs(q_pos, state, source, source_mask)
        return x, dict(pos=self.pos, spec=spec, q_pos=q_pos, cross_spec=cross_spec), caches, cross_kvs

    def universal(self, x: Tensor, caches: list, cross_kvs: list, real: Tensor | None, **kw) -> Tensor:
        """Universal depth (tfx/nn/depth.py): step n runs the shared blocks with the caches of pass
        n * n_layers + i."""
        L = len(self.blocks)

        def step(n: int, h: Tensor) -> Tensor:
            for i, block in enumerate(self.blocks):
                h = self.run_block(block, h, cache=caches[n * L + i], cross_kv=cross_kvs[i], **kw)
            return h

        return self.depth(x, step, real=real)

    def run_block(self, block: Block, x: Tensor, **kw) -> Tensor:
        """One block; with activation checkpointing, while training with gradients, its activations
        are dropped and recomputed in the backward pass (the RNG state is restored for that, so the
        dropout masks are the same). A block that writes state as it runs (a cache, memorizing's kNN
        store through its `recall` hook) is not run twice: it keeps its activations."""
        if (self.activation_checkpointing and self.training and torch.is_grad_enabled()
                and kw["cache"] is None and kw["recall"] is None):
            return checkpoint(block, x, use_reentrant=False, **kw)
        return block(x, **kw)

    def positions(self, tokens: Tensor, state: StackState | None, mems: list[Tensor] | None,
                  wrap: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, int]:
        """(Tq,) query and (Tk,) key positions of a pass, and the largest position + 1: they continue
        the state's, after any segment memory; in a sink cache they are the cache slots."""
        T = tokens.shape[1]
        if wrap is not None:  # a segment with its memory tokens, at positions from 0
            q_pos = torch.arange(T + 2 * wrap[0].shape[1], device=tokens.device)
            return q_pos, q_pos, q_pos.shape[0]
        sink = streaming.sink_of(state)
        if sink is not None:  # positions are cache slots, after the eviction this call makes
            offset = sink.start_for(T)
        else:
            offset = (state.length if state is not None else 0) + (mems[0].shape[1] if mems else 0)
        q_pos = torch.arange(offset, offset + T, device=tokens.device)  # (T,)
        k_pos = torch.arange(0, offset + T, device=tokens.device) if offset else q_pos  # (Tk,)
        return q_pos, k_pos, offset + T

    def cross_inputs(self, q_pos: Tensor, state: StackState | None, source: Tensor | None,
                     source_mask: Tensor | None) -> tuple[list, AttnSpec | None]:
        """Per layer, the source's keys/values (projected once, then kept in the state), and their spec."""
        if not self.has_cross:
            return [None] * len(self.blocks), None
        cross = state.cross if state is not None else None
        if cross is None:
            cross = CrossKV([block.cross.project_source(source) for block in self.blocks], source_mask)
            if state is not None:
                state.cross = cross
        S = cross.kv[0][0].shape[2]
        spec = AttnSpec(q_pos=q_pos, k_pos=torch.arange(S, device=q_pos.device), causal=False,
                        key_padding_mask=cross.mask)
        return cross.kv, spec


def layer_attention(cfg, layer: int):
    """Layer `layer`'s attention table (a per-layer list, or the one table)."""
    layers = getattr(cfg, "attention_layers", None)
    return layers[layer] if layers else cfg.attention


def recompute(stack: TransformerStack, tokens: Tensor, state: StackState, key_padding_mask: Tensor | None,
              source: Tensor | None, source_mask: Tensor | None) -> tuple[Tensor, StackState]:
    """A kernel without a cache (lsh, routing) or memory tokens: the state keeps the token history,
    and each call runs the whole prefix again (keeping only the cross keys/values); returns the new
    tokens' outputs."""
    state.tokens = torch.cat([state.tokens, tokens], dim=1)
    T = tokens.shape[1]
    again = StackState(cross=state.cross)
    h, _ = stack(state.tokens, state=again, key_padding_mask=key_padding_mask, source=source,
                 source_mask=source_mask)
    state.cross = again.cross
    return h[:, -T:], state


def set_activation_checkpointing(model: nn.Module, on: bool) -> int:
    """`train.activation_checkpointing`: switch it on (or off) in every TransformerStack of `model`
    (encoder and decoder alike); returns how many stacks. Raises UsageError, naming the reason, for
    a model whose blocks change state as they run, where running a block again would not give the
    same loss and gradients."""
    stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
    if on and (problems := checkpointing_problems(stacks)):
        raise UsageError("train.activation_checkpointing: " + "; ".join(problems) + "; or turn it off")
    for stack in stacks:
        stack.activation_checkpointing = on
    return len(stacks)


def checkpointing_problems(stacks: list[TransformerStack]) -> list[str]:
    """Why running these stacks' blocks a second time would not repeat the first exactly (empty when
    it would): the attention kernels' `checkpoint_problem`. A memory kind's hooks need no check here:
    a block with one is not recomputed (TransformerStack.run_block)."""
    out: list[str] = []
    for stack in stacks:
        for kernel in (m for m in stack.modules() if isinstance(m, AttentionKernel)):
            if (why := kernel.checkpoint_problem()) is not None and why not in out:
                out.append(why)
    return out
