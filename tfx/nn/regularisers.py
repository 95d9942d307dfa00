"""Two small-data regularisers, for training batches only: word dropout and R-Drop.

Word dropout (`train.word_dropout = p`): each input token's embedding is set to zero with
probability p, the whole vector at once, before the position scheme adds its part (the model still
sees that a word stood there, not which). This is the token dropout of Sennrich et al. (2016,
"Edinburgh Neural Machine Translation Systems for WMT 16"; Nematus's `dropout_source` and
`dropout_target`: one mask per position and sentence, tiled over the embedding), applied to the
input of every stack (an lm's input, a translation's source and target input, an encoder's text).
Gal & Ghahramani (2016, "A Theoretically Grounded Application of Dropout in Recurrent Neural
Networks") drop word *types* instead (every occurrence of a word in a sequence together); tfx
draws each position on its own, as Sennrich et al. do. The kept embeddings are scaled by 1/(1-p)
(inverted dropout), so evaluation and generation use the embeddings as they are: this is Nematus's
`scaled` form; its WMT16-era form left training unscaled and multiplied the embeddings by 1-p at
test time instead, the same up to one constant factor. Gal & Ghahramani's implementations (e.g.
AWD-LSTM's `embedded_dropout`) scale by 1/(1-p) too. Pad, BOS (a classifier's [CLS]) and EOS, and
an encoder's [MASK], are never dropped: they are markers, not words (`keep_ids`).

R-Drop (`train.rdrop = alpha`; Liang et al., 2021, "R-Drop: Regularized Dropout for Neural
Networks"): the batch goes through the model twice, with independent dropout masks (the batch is
stacked on itself along the batch dimension, as the authors' fairseq code does, so one pass draws
both), and the two output distributions are pulled together. The paper's loss (its eq. 3) is

    NLL(p1) + NLL(p2) + alpha * 1/2 [KL(p1 || p2) + KL(p2 || p1)]

summed over the non-padding target positions (their fairseq criterion divides it by the tokens of
one copy; their README's classification snippet uses the MEAN of the two NLLs with the same KL
term, which doubles alpha's weight). tfx returns HALF of eq. (3): the mean of the two NLLs plus
alpha/2 times the symmetric KL, so that `alpha` weighs the KL against the NLL exactly as in the
paper (its alpha values carry over), the logged training loss stays on the scale of the plain
per-token loss (the NLL, plus the KL part), and the loss contract (a model's `loss(batch)` is
summed over tokens and the loop divides by their count) is unchanged. The gradient is half the
paper's: Adam's steps do not depend on that scale (but for its eps); gradient clipping sees half
the norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# pad, bos, eos: every tokenizer kind reserves these ids (tfx.data.tokenizers.Tokenizer; tested)
SPECIAL_IDS = (0, 1, 2)


class WordDropout(nn.Module):
    """Zero each token's embedding with probability `p` (training only); see the module docstring."""

    def __init__(self, p: float = 0.0, keep_ids: tuple[int, ...] = SPECIAL_IDS):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"word dropout probability {p}: expected a value in [0, 1)")
        self.p, self.keep_ids = p, tuple(keep_ids)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        """(B, T, d) embeddings of the (B, T) tokens -> the same, some rows zero, the others / (1-p)."""
        if not (self.p > 0 and self.training):  # draws no random number otherwise: later masks stay put
            return x
        drop = torch.rand(tokens.shape, device=tokens.device) < self.p
        protected = torch.isin(tokens, torch.tensor(self.keep_ids, device=tokens.device))
        scale = ((~drop).to(x.dtype) / (1.0 - self.p)).masked_fill(protected, 1.0)  # (B, T)
        return x * scale[..., None]

    def extra_repr(self) -> str:
        return f"p={self.p}, keep_ids={self.keep_ids}"


def twice(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Each tensor stacked on itself along dim 0 (None stays None): one forward pass then makes
    R-Drop's two passes, each half with its own dropout masks."""
    return tuple(None if t is None else torch.cat([t, t]) for t in tensors)


def symmetric_kl(logits1: Tensor, logits2: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum over the positions where `mask` is True (all without one) of 1/2 [KL(p1 || p2) + KL(p2 || p1)],
    p = softmax(logits) over the last dimension: R-Drop's term. Computed as
    1/2 sum_v (p1 - p2)(log p1 - log p2), which is that sum of the two KLs; in float32 at least."""
    if mask is not None:
        logits1, logits2 = logits1[mask], logits2[mask]
    dtype = torch.promote_types(logits1.dtype, torch.float32)
    log1, log2 = F.log_softmax(logits1.to(dtype), -1), F.log_softmax(logits2.to(dtype), -1)
    return 0.5 * ((log1.exp() - log2.exp()) * (log1 - log2)).sum()


def rdrop_loss(logits1: Tensor, logits2: Tensor, target: Tensor, alpha: float, *, label_smoothing: float = 0.0,
               ignore_index: int = -100) -> Tensor:
    """Half of R-Drop's eq. (3), summed over the rows whose target is not `ignore_index`:
    1/2 [CE(logits1, target) + CE(logits2, target) + alpha * symmetric_kl(logits1, logits2)].
    (N, C) logits of the two passes, (N,) targets."""
    both = torch.cat([logits1, logits2])
    dtype = torch.promote_types(both.dtype, torch.float32)
    nll = F.cross_entropy(both.to(dtype), torch.cat([target, target]), ignore_index=ignore_index,
                          reduction="sum", label_smoothing=label_smoothing)
    if not alpha:
        return 0.5 * nll
    return 0.5 * (nll + alpha * symmetric_kl(logits1, logits2, target != ignore_index))


def rdrop_head_loss(head: nn.Module, h: Tensor, target: Tensor, alpha: float, *, label_smoothing: float = 0.0,
                    ignore_index: int = -100) -> Tensor:
    """rdrop_loss for a token-level model: `h` (2B, T, d) are the doubled batch's states (the two
    passes stacked along dim 0, `twice`), `target` (B, T) the batch's ids. Only the positions with
    a target go through the output `head`, once for both passes."""
    keep = target != ignore_index
    first, second = h.chunk(2)
    logits = head(torch.cat([first[keep], second[keep]]))  # (2K, vocab)
    l1, l2 = logits.chunk(2)
    return rdrop_loss(l1, l2, target[keep], alpha, label_smoothing=label_smoothing, ignore_index=ignore_index)
