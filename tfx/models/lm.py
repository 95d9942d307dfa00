"""Decoder-only language model (Radford et al., 2018): a causal stack and a (tied) output head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfx.errors import UsageError
from tfx.nn.early_exit import Exits
from tfx.nn.loss import linear_cross_entropy
from tfx.nn.regularisers import rdrop_head_loss, twice
from tfx.nn.stack import TransformerStack
from tfx.nn.state import StackState

IGNORE = -100  # target id that takes no loss


def output_head(d_model: int, vocab_size: int, embed: nn.Embedding | None) -> nn.Linear:
    """The vocabulary projection, sharing `embed`'s matrix when given (tied embeddings)."""
    head = nn.Linear(d_model, vocab_size, bias=False)
    if embed is not None:
        head.weight = embed.weight
    else:
        nn.init.normal_(head.weight, std=0.02)
    return head


def token_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy over the target ids that are not IGNORE (the loop divides by their count)."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum",
                           label_smoothing=label_smoothing)


def head_loss(head: nn.Linear, h: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """token_loss(head(h), target): fused with the projection and chunked (tfx.nn.loss), so no
    (tokens x vocabulary) logits are kept; under autocast or torch.compile, the plain two steps."""
    if head.bias is not None or torch.is_autocast_enabled(h.device.type) or torch.compiler.is_compiling():
        return token_loss(head(h), target, label_smoothing)
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, target.reshape(-1),
                                label_smoothing=label_smoothing, ignore_index=IGNORE)


def make_exits(cfg, n_layers: int) -> Exits | None:
    """CALM's exits for a decoder of n_layers (`[model.exit]`), or None."""
    if getattr(getattr(cfg, "exit", None), "kind", "none") == "none":
        return None
    return Exits(cfg.exit, n_layers=n_layers, d_model=cfg.d_model, norm=cfg.norm, eps=cfg.norm_eps, bias=cfg.bias)


def exit_loss(exits: Exits, head: nn.Linear, outputs: list[Tensor], final: Tensor, target: Tensor,
              label_smoothing: float = 0.0) -> tuple[Tensor, dict]:
    """(CALM's depth-weighted summed loss, parts with the exit classifier's loss as `aux_loss`)."""
    loss, aux = exits.loss(head, outputs, final, target,
                           lambda hd, h, t: head_loss(hd, h, t, label_smoothing), IGNORE)
    return loss, {"aux_loss": aux} if aux is not None else {}


class LanguageModel(nn.Module):
    """Next-token prediction over a causal TransformerStack."""

    def __init__(self, cfg, *, vocab_size: int, word_dropout: float = 0.0, rdrop: float = 0.0):
        """`word_dropout`, `rdrop`: the training-only regularisers of tfx/nn/regularisers.py."""
        super().__init__()
        self.cfg, self.vocab_size, self.rdrop = cfg, vocab_size, rdrop
        if rdrop and (memory := getattr(getattr(cfg, "memory", None), "kind", "none")) != "none":
            raise UsageError(f"train.rdrop: R-Drop runs each batch twice side by side, which a segment memory "
                             f"(model.memory.kind = {memory!r}) cannot carry; set train.rdrop = 0 "
                             f"or model.memory.kind = \"none\"")
        self.stack = TransformerStack(cfg, vocab_size=vocab_size, causal=True, word_dropout=word_dropout)
        self.head = output_head(cfg.d_model, vocab_size, self.stack.embed if cfg.tie_embeddings else None)
        self.exits = make_exits(cfg, cfg.n_layers)

    @property
    def context(self) -> int:
        """Positions a token can attend to: the training context, plus the XL memory if any
        (generation keeps that many in its KV cache)."""
        return self.cfg.context + self.stack.mem_len

    def new_state(self, batch: int, max_len: int | None = None, **kw) -> StackState:
        return self.stack.new_state(batch, max_len or self.cfg.context, **kw)

    def new_stream_state(self, batch: int, *, sinks: int, window: int, **kw) -> StackState:
        """A sink cache (StreamingLLM): the first `sinks` and the last `window` tokens, any length."""
        return self.stack.new_stream_state(batch, sinks=sinks, window=window, **kw)

    def restore_memory(self, saved: dict | list, device) -> StackState:
        """The segment-memory state a checkpoint saved (the memory kind's State.save())."""
        return self.stack.restore_memory(saved, device)

    def forward(self, tokens: Tensor, state: StackState | None = None, *,
                last: bool = False) -> tuple[Tensor, StackState | None]:
        """(B, T) token ids -> (B, T, vocab) logits; the state's caches are extended in place.
        `last`: only the last position's logits, (B, 1, vocab) (a prefill needs no others)."""
        if self.exits is not None and self.exits.active(tokens, state, self.training):
            return self.exits.run(self.stack, self.head, tokens, state)[0], state
        h, state = self.stack(tokens, state=state)
        return self.head(h[:, -1:] if last else h), state

    def loss(self, batch: dict, state: StackState | None = None) -> tuple[Tensor, dict, StackState | None]:
        """Summed cross-entropy over the batch's target tokens (the loop divides by the token count).
        With an XL memory the state carries it between consecutive segments; `reset` starts afresh."""
        if self.rdrop and self.training:  # R-Drop: two passes side by side (no memory: refused above)
            h, _ = self.stack(*twice(batch["input"]))
            return rdrop_head_loss(self.head, h, batch["target"], self.rdrop, ignore_index=IGNORE), {}, None
        if self.stack.recurrent and (state is None or bool(batch.get("reset", False))):
            state = self.stack.new_memory()
        if (see := getattr(self.stack.recurrence, "see_batch", None)) is not None:
            see(state.memory, batch)  # what the memory kind reads from the batch itself (spalm: stream positions)
        if self.exits is not None and self.training:  # CALM: every layer's exit takes a loss
            outputs: list = []
            h, state = self.stack(batch["input"], state=state, outputs=outputs)
            return exit_loss(self.exits, self.head, outputs, h, batch["target"]) + (state,)
        h, state = self.stack(batch["input"], state=state)
        parts = {"aux_loss": state.aux_loss} if state is not None and state.aux_loss is not None else {}
        return head_loss(self.head, h, batch["target"]), parts, state

    @staticmethod
    def count_tokens(batch: dict) -> int:
        return int((batch["target"] != IGNORE).sum())
