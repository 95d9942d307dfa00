"""Generation with a segment memory that a KV cache cannot hold (the Compressive Transformer's
compressed memory, the Memorizing Transformer's kNN store): the text is read the way evaluation reads
it (tfx.evaluate.score_stream_recurrent), in segments of the training context from its first token,
the memory carried at the end of each full segment. The logits after an unfinished segment come
from running that segment so far over a copy of the memory, which the run leaves unchanged. So each
generated token's distribution is exactly the one evaluation gives at that position; the price is
that each new token re-reads its unfinished segment (at most `context` tokens) instead of one step.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor


def reads_by_segments(model) -> bool:
    """Whether `model`'s memory is generated with segments (its kind sets `decodes_by_segments`)."""
    recurrence = getattr(getattr(model, "stack", None), "recurrence", None)
    return bool(getattr(recurrence, "decodes_by_segments", False))


class SegmentReader:
    """Feeds tokens to a segment-memory LM; `feed(ids)` returns the (1, 1, V) logits after the last."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.segment = model.cfg.context
        self.state = model.stack.new_memory()  # the memory after the last full segment
        self.pending: list[int] = []           # the unfinished segment's tokens

    def run(self, ids: list[int], state) -> Tensor:
        logits, _ = self.model(torch.tensor([ids], device=self.device), state, last=True)
        return logits

    def feed(self, ids: list[int]) -> Tensor:
        logits = None
        for token in ids:
            self.pending.append(token)
            if len(self.pending) == self.segment:  # a full segment: the memory moves on
                logits = self.run(self.pending, self.state)
                self.pending = []
        if self.pending:
            peek = copy.copy(self.state)
            peek.memory = copy.copy(self.state.memory)  # kinds replace their fields, never write into them
            logits = self.run(self.pending, peek)
        return logits
