"""Metrics as pure functions of summed statistics."""
from __future__ import annotations

import math


def lm_metrics(nll_sum: float, tokens: int, n_bytes: int | None = None) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte (comparable across tokenizers)."""
    loss = nll_sum / max(tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    if n_bytes:
        out["bits_per_byte"] = nll_sum / math.log(2) / n_bytes
    return out
