"""Encoder-decoder Transformer (Vaswani et al., 2017) from the same stack as the LM.

A non-causal encoder reads the padded source; a causal decoder with cross-attention predicts the
target. With a joint vocabulary the source, target and output embeddings are one matrix.
Training-only regularisers: label smoothing, word dropout on both inputs, R-Drop (tfx/nn/regularisers.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tfx.models.lm import IGNORE, exit_loss, head_loss, make_exits, output_head
from tfx.nn.regularisers import rdrop_head_loss, twice
from tfx.nn.stack import TransformerStack
from tfx.nn.state import CrossKV, StackState


class Seq2Seq(nn.Module):
    """`loss(batch)` for training; `encode` + `forward(tokens, state)` for decoding."""

    def __init__(self, cfg, *, vocab_size: int, src_vocab_size: int | None = None, label_smoothing: float = 0.0,
                 word_dropout: float = 0.0, rdrop: float = 0.0):
        """`src_vocab_size`: a separate source vocabulary (then only the decoder's input and output
        embeddings can be tied)."""
        super().__init__()
        self.cfg, self.vocab_size, self.label_smoothing, self.rdrop = cfg, vocab_size, label_smoothing, rdrop
        joint = src_vocab_size is None
        self.encoder = TransformerStack(cfg, vocab_size=vocab_size if joint else src_vocab_size, causal=False,
                                        n_layers=cfg.encoder_layers, word_dropout=word_dropout)
        shared = self.encoder.embed if cfg.tie_embeddings and joint else None
        self.decoder = TransformerStack(cfg, vocab_size=vocab_size, causal=True, n_layers=cfg.decoder_layers,
                                        cross=True, embed=shared, word_dropout=word_dropout)
        self.head = output_head(cfg.d_model, vocab_size, self.decoder.embed if cfg.tie_embeddings else None)
        self.exits = make_exits(cfg, self.decoder.n_layers)  # CALM (tfx/nn/early_exit.py), or None
        if getattr(cfg, "head_bias", False):  # Marian's final_logits_bias; made last: others' init is unchanged
            self.head.bias = nn.Parameter(torch.zeros(vocab_size))

    @property
    def context(self) -> int:
        return self.cfg.context

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """(B, S) source ids and (B, S) True-for-real-token mask -> (B, S, d_model)."""
        source, _ = self.encoder(src, key_padding_mask=src_mask)
        return source

    def new_state(self, source: Tensor, source_mask: Tensor, max_len: int | None = None) -> StackState:
        """Decoder caches for one decoding pass over these encoder outputs (B, S, d_model)."""
        state = self.decoder.new_state(source.shape[0], max_len or self.cfg.context, dtype=source.dtype)
        state.cross = CrossKV([blk.cross.project_source(source) for blk in self.decoder.blocks], source_mask)
        return state

    def forward(self, tokens: Tensor, state: StackState) -> tuple[Tensor, StackState]:
        """Decoder step(s): (B, T) target ids -> (B, T, vocab) logits, extending the state's cache."""
        if self.exits is not None and self.exits.active(tokens, state, self.training):
            return self.exits.run(self.decoder, self.head, tokens, state)[0], state
        h, state = self.decoder(tokens, state=state)
        return self.head(h), state

    def loss(self, batch: dict, state=None) -> tuple[Tensor, dict, None]:
        """Summed (label-smoothed) cross-entropy over the real target tokens; with R-Drop, while
        training, over two passes of the batch at once (their mean, plus the KL term)."""
        rdrop = self.rdrop if self.training else 0.0
        src, src_mask, tgt_in = batch["src"], batch["src_mask"], batch["tgt_in"]
        if rdrop:
            src, src_mask, tgt_in = twice(src, src_mask, tgt_in)
        outputs: list | None = [] if self.exits is not None and self.training else None  # CALM's exits
        h, _ = self.decoder(tgt_in, source=self.encode(src, src_mask), source_mask=src_mask, outputs=outputs)
        smoothing = self.label_smoothing if self.training else 0.0
        if outputs is not None:
            return exit_loss(self.exits, self.head, outputs, h, batch["tgt_out"], smoothing) + (None,)
        if rdrop:
            return rdrop_head_loss(self.head, h, batch["tgt_out"], rdrop, label_smoothing=smoothing), {}, None
        return head_loss(self.head, h, batch["tgt_out"], smoothing), {}, None

    @staticmethod
    def count_tokens(batch: dict) -> int:
        return int((batch["tgt_out"] != IGNORE).sum())
