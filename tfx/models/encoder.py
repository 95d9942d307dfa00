"""Encoder-only models (Devlin et al., 2019): a masked-LM for pretraining and a classifier.

Both name their stack `encoder`, so a classifier can start from a pretrained masked-LM run. The
vocabulary has one id past the tokenizer's: [MASK] = vocab_size - 1. Both take the training-only
regularisers of tfx/nn/regularisers.py (word dropout never drops [CLS] = BOS, EOS, pad or [MASK]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfx.models.lm import IGNORE, head_loss, output_head
from tfx.nn.regularisers import SPECIAL_IDS, rdrop_head_loss, rdrop_loss, twice
from tfx.nn.layers import make_norm
from tfx.nn.stack import TransformerStack


def encoder_stack(cfg, vocab_size: int, word_dropout: float) -> TransformerStack:
    """The non-causal stack of both models; word dropout keeps the markers and [MASK] (the last id)."""
    return TransformerStack(cfg, vocab_size=vocab_size, causal=False, word_dropout=word_dropout,
                            keep_ids=SPECIAL_IDS + (vocab_size - 1,))


class MaskedLM(nn.Module):
    """BERT's masked-LM objective: predict the masked positions of a non-causal encoder's input."""

    def __init__(self, cfg, *, vocab_size: int, mask_prob: float = 0.15, word_dropout: float = 0.0,
                 rdrop: float = 0.0):
        super().__init__()
        self.cfg, self.vocab_size, self.mask_prob, self.rdrop = cfg, vocab_size, mask_prob, rdrop
        self.mask_id = vocab_size - 1
        self.encoder = encoder_stack(cfg, vocab_size, word_dropout)
        # BERT's prediction head (model.head_transform): dense + GELU + norm, then the output layer with a bias
        self.transform = HeadTransform(cfg) if getattr(cfg, "head_transform", False) else None
        self.head = output_head(cfg.d_model, vocab_size, self.encoder.embed if cfg.tie_embeddings else None)
        if self.transform is not None:
            self.head.bias = nn.Parameter(torch.zeros(vocab_size))

    def hidden(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """What the output layer reads: the encoder's states, through the head's transform if any."""
        h, _ = self.encoder(tokens, key_padding_mask=mask)
        return self.transform(h) if self.transform is not None else h

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(tokens, mask))  # (B, T, vocab)

    def loss(self, batch: dict, state=None) -> tuple[Tensor, dict, None]:
        """Summed loss over the masked positions; only their states go through the output head
        (~15% of the tokens), as in BERT's reference pretraining code. R-Drop (training): two passes."""
        if self.rdrop and self.training:
            h = self.hidden(*twice(batch["input"], batch.get("mask")))
            return rdrop_head_loss(self.head, h, batch["target"], self.rdrop, ignore_index=IGNORE), {}, None
        h = self.hidden(batch["input"], batch.get("mask"))
        target = batch["target"]
        picked = target != IGNORE
        return head_loss(self.head, h[picked][None], target[picked][None]), {}, None  # (1, masked, d)

    @staticmethod
    def count_tokens(batch: dict) -> int:
        """The loss is per masked token."""
        return int((batch["target"] != IGNORE).sum())

    @staticmethod
    def input_tokens(batch: dict) -> int:
        return int(batch["input"].numel())


class HeadTransform(nn.Module):
    """BERT's transform before the masked-LM output layer: norm(GELU(dense(h)))."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(h)))


def mask_tokens(tokens: Tensor, *, prob: float, mask_id: int, vocab: int, special: tuple[int, ...],
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT masking: pick `prob` of the non-special positions; of those 80% become [MASK], 10% a
    random token, 10% stay. Returns (input, target) with IGNORE where nothing is predicted."""
    shape = tokens.shape
    eligible = torch.ones(shape, dtype=torch.bool)
    for s in special:
        eligible &= tokens != s
    chosen = (torch.rand(shape, generator=generator) < prob) & eligible
    roll = torch.rand(shape, generator=generator)
    inputs = tokens.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(len(special), vocab - 1, shape, generator=generator)[swap]
    target = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))
    return inputs, target


class Classifier(nn.Module):
    """Text classification: a non-causal encoder, [CLS] (first token), mean or BERT's pooler, a linear head."""

    def __init__(self, cfg, *, vocab_size: int, n_labels: int, word_dropout: float = 0.0, rdrop: float = 0.0):
        super().__init__()
        self.cfg, self.vocab_size, self.n_labels, self.rdrop = cfg, vocab_size, n_labels, rdrop
        self.encoder = encoder_stack(cfg, vocab_size, word_dropout)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pool == "pooler" else None  # BERT's: tanh over [CLS]
        if self.pooler is not None:
            nn.init.normal_(self.pooler.weight, std=0.02)
            nn.init.zeros_(self.pooler.bias)
        self.head = nn.Linear(cfg.d_model, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """(B, T) ids, (B, T) True-for-real-token -> (B, n_labels) logits."""
        h, _ = self.encoder(tokens, key_padding_mask=mask)  # (B, T, d_model)
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(h[:, 0]))
        elif self.cfg.pool == "cls":
            pooled = h[:, 0]
        else:
            weights = mask.to(h.dtype)[..., None]  # (B, T, 1)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)

    def loss(self, batch: dict, state=None) -> tuple[Tensor, dict, None]:
        """Summed cross-entropy over the examples; with R-Drop, while training, over two passes."""
        if self.rdrop and self.training:
            first, second = self(*twice(batch["input"], batch["mask"])).chunk(2)
            return rdrop_loss(first, second, batch["label"], self.rdrop), {}, None
        logits = self(batch["input"], batch["mask"])
        return F.cross_entropy(logits.float(), batch["label"], reduction="sum"), {}, None

    @staticmethod
    def count_tokens(batch: dict) -> int:
        """The loss is per example."""
        return int(batch["label"].numel())

    @staticmethod
    def input_tokens(batch: dict) -> int:
        """Throughput counts the real input tokens."""
        return int(batch["mask"].sum())
