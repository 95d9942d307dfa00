"""Logit processors (temperature, top-k, nucleus) and sampling."""
from __future__ import annotations

import torch
from torch import Tensor


def process_logits(logits: Tensor, *, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> Tensor:
    """(B, V) logits -> logits with filtered entries at -inf, scaled by 1/temperature."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al., 2020): the smallest set whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = before >= top_p  # never drops the first token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    if generator is not None and probs.device.type != "cpu":
        probs = probs.cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
