"""MEGABYTE (Yu et al., 2023): a byte-level LM in two levels, `[model.patches] size = P` (lm family).

The logits at position t predict input t + 1 from inputs 0..t, as for every tfx LM. Positions are
grouped in patches of P: patch k holds positions kP .. kP + P - 1.

- The global model (the recipe's [model]: d_model, n_layers, attention, position) reads one vector per
  patch: patch k's is the concatenation of the byte embeddings (d_model / P each) of inputs
  (k-1)P + 1 .. kP, the inputs every position of patch k already knows; patch 0's is a learned vector.
  It is causal over patches, so its output for patch k has seen inputs up to kP and none after.
- The local model ([model.patches] local_layers, local_d_model, local_heads; the recipe's position
  scheme; dense attention) reads each patch on its own, causally: at position kP + p its input is the
  p-th of P slices (d_model / P) of the global output for patch k, projected to local_d_model, plus the
  local embedding of input kP + p. Its outputs go through the output head.

So position t sees inputs <= t only (tested by gradient across patch borders). Generation keeps a KV
cache at both levels: one global step when a patch starts (its input then is known), one local step
per byte on a local cache that starts afresh with each patch (MegabyteState).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfx.errors import UsageError
from tfx.registry import ATTENTION
from tfx.nn.stack import TransformerStack
from tfx.nn.state import StackState


def patches_problems(recipe, family) -> list[str]:
    """Why `[model.patches]` cannot work with the rest of the recipe (empty when it can, or when off);
    `family` is the recipe's Family record."""
    m = recipe.model
    P = m.patches.size
    if not P:
        return []
    out = []
    if not family.continues_text:
        out.append(f"model.patches: MEGABYTE is a decoder-only byte model (family = \"lm\"), not {recipe.family!r}")
    if m.context % P or m.d_model % P:
        out.append(f"model.patches.size ({P}) must divide model.context ({m.context}) and model.d_model "
                   f"({m.d_model}): the global model reads context / size patches of size byte embeddings of "
                   f"d_model / size each")
    for what, on in (("a segment memory (model.memory)", m.memory.kind != "none"),
                     ("CALM's exits (model.exit)", m.exit.kind != "none"),
                     ("universal depth (model.depth)", m.depth.kind != "layers"),
                     ("per-layer attention", bool(m.attention_layers)),
                     (f"{m.attention.kind!r}, which has no KV cache", not ATTENTION.get(m.attention.kind).supports_cache),
                     ("train.rdrop", recipe.train.rdrop > 0), ("train.word_dropout", recipe.train.word_dropout > 0)):
        if on:
            out.append(f"model.patches: MEGABYTE does not combine with {what}")
    return out


@dataclass
class MegabyteState:
    """Generation state: the global stack's KV caches (one position per patch), the current patch's
    local caches and global slices (B, P, local_d_model), the last P inputs and how many were read."""

    global_state: StackState
    local_state: StackState | None = None
    slices: Tensor | None = None
    recent: Tensor | None = None
    length: int = 0

    def reorder(self, index: Tensor) -> None:
        self.global_state.reorder(index)
        if self.local_state is not None:
            self.local_state.reorder(index)
        self.slices = self.slices.index_select(0, index) if self.slices is not None else None
        self.recent = self.recent.index_select(0, index) if self.recent is not None else None


class Megabyte(nn.Module):
    """Next-byte prediction by a global model over patches and a local model within each patch."""

    knn_keys = False  # tfx/knn/keys.py: no one stack holds a state per byte in text order

    def __init__(self, cfg, *, vocab_size: int):
        super().__init__()
        p = cfg.patches
        self.cfg, self.vocab_size, self.P = cfg, vocab_size, p.size
        self.e = cfg.d_model // p.size  # one byte's share of a patch vector
        off = type(p)()
        global_cfg = cfg.model_copy(update={"context": cfg.context // p.size, "patches": off})
        d_local = p.local_d_model or cfg.d_model
        local_cfg = cfg.model_copy(update={
            "d_model": d_local, "n_layers": p.local_layers, "n_heads": p.local_heads or cfg.n_heads, "n_kv_heads": None,
            "d_head": None, "d_ff": None, "context": p.size, "patches": off,
            "attention": ATTENTION.config_model("dense")(), "attention_layers": None})
        if d_local % local_cfg.n_heads:
            raise UsageError(f"model.patches: local_d_model ({d_local}) must be divisible by local_heads "
                             f"({local_cfg.n_heads})")
        self.global_stack = TransformerStack(global_cfg, vocab_size=0, causal=True)
        self.local_stack = TransformerStack(local_cfg, vocab_size=vocab_size, causal=True)
        self.global_embed = nn.Embedding(vocab_size, self.e)
        self.first_patch = nn.Parameter(torch.zeros(cfg.d_model))
        self.to_local = nn.Linear(self.e, d_local, bias=cfg.bias)
        self.head = nn.Linear(d_local, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.local_stack.embed.weight
        for w in (self.global_embed.weight, self.first_patch, self.to_local.weight) + (() if cfg.tie_embeddings
                                                                                       else (self.head.weight,)):
            nn.init.normal_(w, std=0.02)
        if self.to_local.bias is not None:
            nn.init.zeros_(self.to_local.bias)

    @property
    def stack(self) -> TransformerStack:
        """The global stack (what tools that ask an LM for its `stack` see: no memory, no sink cache)."""
        return self.global_stack

    @property
    def context(self) -> int:
        return self.cfg.context

    # ----------------------------------------------------------------------------- parallel

    def forward(self, tokens: Tensor, state: MegabyteState | None = None, *,
                last: bool = False) -> tuple[Tensor, MegabyteState | None]:
        """(B, T) ids -> (B, T, vocab) logits (the last position's only with `last`); with a state,
        the tokens continue it (its caches are extended)."""
        if state is not None:
            h = self.steps(tokens, state, last=last)
            return self.head(h), state
        h = self.read(tokens)
        return self.head(h[:, -1:] if last else h), None

    def read(self, tokens: Tensor) -> Tensor:
        """The local model's (B, T, d_local) outputs for (B, T) ids, in one parallel pass."""
        return self.hidden(self.global_embed(tokens), self.local_stack.embed(tokens))

    def hidden(self, global_emb: Tensor, local_emb: Tensor) -> Tensor:
        """The local model's (B, T, d_local) outputs from the inputs' (B, T, e) global and (B, T, d_local)
        local embeddings (separate, so that a test can differentiate with respect to each position)."""
        B, T, _ = global_emb.shape
        P = self.P
        K = -(-T // P)
        known = global_emb[:, 1:1 + (K - 1) * P].reshape(B, K - 1, P * self.e)  # patch k: inputs (k-1)P+1 .. kP
        patches = torch.cat([self.first_patch.expand(B, 1, -1).to(known.dtype), known], 1)  # (B, K, d_model)
        g, _ = self.global_stack(None, embeds=patches)  # (B, K, d_model)
        slices = self.to_local(g.view(B, K, P, self.e))  # (B, K, P, d_local)
        local = F.pad(local_emb, (0, 0, 0, K * P - T)).view(B, K, P, -1)
        h, _ = self.local_stack(None, embeds=(slices + local).flatten(0, 1))  # each patch alone: (B*K, P, d_local)
        return h.view(B, K * P, -1)[:, :T]

    def loss(self, batch: dict, state=None) -> tuple[Tensor, dict, None]:
        from tfx.models.lm import head_loss

        return head_loss(self.head, self.read(batch["input"]), batch["target"]), {}, None

    @staticmethod
    def count_tokens(batch: dict) -> int:
        from tfx.models.lm import IGNORE

        return int((batch["target"] != IGNORE).sum())

    # ----------------------------------------------------------------------------- generation

    def new_state(self, batch: int, max_len: int | None = None, *, device=None, dtype=None) -> MegabyteState:
        patches = -(-(max_len or self.cfg.context) // self.P)
        w = self.first_patch
        return MegabyteState(self.global_stack.new_state(batch, patches, device=device or w.device,
                                                         dtype=dtype or w.dtype))

    def new_stream_state(self, *_, **__):
        raise UsageError("--stream-window: a MEGABYTE run's caches hold patches and bytes, not a sink cache")

    def steps(self, tokens: Tensor, state: MegabyteState, *, last: bool = False) -> Tensor:
        """Read (B, n) tokens one at a time: a global step when a patch starts, then a local step.
        Returns the local outputs (B, n, d_local), or (B, 1, d_local) with `last`."""
        P, B = self.P, tokens.shape[0]
        outs = []
        for j in range(tokens.shape[1]):
            token = tokens[:, j:j + 1]  # (B, 1)
            state.recent = token if state.recent is None else torch.cat([state.recent, token], 1)[:, -P:]
            p = state.length % P
            if p == 0:  # patch k = length / P starts: its global input is known now
                if state.length == 0:
                    patch = self.first_patch.expand(B, 1, -1)
                else:
                    patch = self.global_embed(state.recent).reshape(B, 1, P * self.e)
                g, _ = self.global_stack(None, state=state.global_state, embeds=patch.to(self.first_patch.dtype))
                state.slices = self.to_local(g.view(B, P, self.e))  # (B, P, d_local)
                state.local_state = self.local_stack.new_state(B, P, device=tokens.device, dtype=g.dtype)
            x = state.slices[:, p:p + 1] + self.local_stack.embed(token)  # (B, 1, d_local)
            h, _ = self.local_stack(None, state=state.local_state, embeds=x)
            outs.append(h)
            state.length += 1
        return outs[-1] if last else torch.cat(outs, 1)
