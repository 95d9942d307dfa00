"""Autoregressive generation: one prefill, then one cached step per token.

When the cache reaches the model's context, the last half of the text is prefilled again at
positions from zero (a sliding window), so any length can be generated with any position scheme.
An LM-Infinite model (tfx/nn/attention/lm_infinite.py) reads the whole prompt and keeps one cache.

`adjust_logprobs`, when given, maps the last position's (1, V) log-probs to new ones before
sampling (e.g. tfx.knn.scoring.KNNAdjuster interpolates a kNN-LM distribution).
"""
from __future__ import annotations

from typing import Callable

import torch

from tfx.decoding.sample import sample
from tfx.decoding.segments import SegmentReader, reads_by_segments
from tfx.nn.attention.lm_infinite import reads_any_length


def decode_step(model, compiled: bool = False) -> Callable:
    """What one-token decode steps call: the model, or with `compiled` the model through
    torch.compile with dynamic shapes (one graph for every cache length; torch keeps it for the
    process, so later prompts reuse it) and inductor's C++ wrapper, which launches the step's
    kernels from C++ instead of Python (at batch 1 the step is mostly launch overhead; measured
    1.2-1.3x faster than the Python wrapper, and quicker to compile). Prefills stay eager."""
    return torch.compile(model, dynamic=True, options={"cpp_wrapper": True}) if compiled else model


@torch.inference_mode()
def generate_ids(model, ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_ids: set[int] = frozenset(),
                 banned_ids: tuple[int, ...] = (), generator: torch.Generator | None = None,
                 on_token: Callable[[int], bool] | None = None,
                 adjust_logprobs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 stream: tuple[int, int] | None = None, compile: bool = False) -> list[int]:
    """New token ids after `ids` (kept to the context by generate_text, except for an LM-Infinite model and a
    segment memory read by segments, tfx.decoding.segments). `on_token` returning True stops.
    `stream` = (sinks, window): a sink cache (StreamingLLM) instead, any length, never recomputed.
    `compile`: one-token steps through torch.compile (decode_step)."""
    device = next(model.parameters()).device
    advance = (SegmentReader(model, device).feed if stream is None and reads_by_segments(model)
               else cached_steps(model, len(ids) + max_new_tokens, stream, compile, device))
    logits = advance(list(ids))
    out: list[int] = []
    banned = torch.tensor(banned_ids, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        last = logits[:, -1].float()  # (1, V)
        if adjust_logprobs is not None:
            last = adjust_logprobs(last.log_softmax(-1))
        if banned.numel():
            last[:, banned] = float("-inf")
        token = int(sample(last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
        if token in stop_ids:
            break
        out.append(token)
        if on_token is not None and on_token(token):
            break
        logits = advance([token])
    return out


def cached_steps(model, length: int, stream: tuple[int, int] | None, compile: bool, device) -> Callable:
    """feed(ids) -> the (1, 1, V) logits after them: the first call prefills the KV cache, later ones
    (one token each) take one cached step. When the cache reaches the context, the last half of the
    text is prefilled again; a sink cache (`stream`) never fills; an LM-Infinite model gets a cache of
    `length` (the whole text) and never refills."""
    context = length if stream is None and reads_any_length(model) else model.context
    state = model.new_state(1, context) if stream is None else \
        model.new_stream_state(1, sinks=stream[0], window=stream[1])
    step = decode_step(model, compile)
    history: list[int] = []

    def feed(ids: list[int]):
        nonlocal state
        first = not history
        history.extend(ids)
        if first:
            logits, state = model(torch.tensor([history], device=device), state, last=True)
        elif stream is None and state.length >= context:
            state = model.new_state(1, context)
            logits, state = model(torch.tensor([history[-(context // 2 or 1):]], device=device), state, last=True)
        else:
            logits, state = step(torch.tensor([ids], device=device), state)
        return logits

    return feed


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, stop: list[str] | None = None,
                  generator: torch.Generator | None = None, on_text: Callable[[str], None] | None = None,
                  warn: Callable[[str], None] = print,
                  adjust_logprobs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  stream: tuple[int, int] | None = None, compile: bool = False) -> str:
    """Continue `prompt`; the text stops at the first `stop` string (excluded) or end of text.
    With `stream` (sinks, window) the whole prompt is read through the sink cache."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    if stream is None and len(ids) > model.context and not reads_any_length(model) and not reads_by_segments(model):
        warn(f"warning: the prompt has {len(ids)} tokens, more than the context ({model.context}); "
             f"keeping the last {model.context}")
        ids = ids[-model.context:]
    stop = [s for s in (stop or []) if s]
    new: list[int] = []
    shown = ""

    def on_token(token: int) -> bool:
        nonlocal shown
        new.append(token)
        text = tokenizer.decode(new)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        visible = text if cut < 0 else text[:cut]
        if on_text is not None:
            # Hold back a trailing partial character or a possible stop-string prefix.
            safe = visible.rstrip("\ufffd")
            if stop and cut < 0:
                longest = max(len(s) for s in stop) - 1
                safe = safe[: max(len(shown), len(safe) - longest)]
            if safe.startswith(shown) and len(safe) > len(shown):
                on_text(safe[len(shown):])
                shown = safe
        return cut >= 0

    stop_ids = {tokenizer.eos_id, tokenizer.bos_id}
    # never ban a stop id (an imported GPT-2 tokenizer has pad = unk = eos)
    banned_ids = tuple(dict.fromkeys(i for i in (tokenizer.pad_id, tokenizer.unk_id) if i not in stop_ids))
    generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 stop_ids=stop_ids, banned_ids=banned_ids,
                 generator=generator, on_token=on_token, adjust_logprobs=adjust_logprobs, stream=stream,
                 compile=compile)
    text = tokenizer.decode(new)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    text = text if cut < 0 else text[:cut]
    if on_text is not None and text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown):])
    return text

