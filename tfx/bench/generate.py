"""`tfx bench generate RUN`: prefill and cached-decode speed of a trained LM.

The prompt is B rows of P token ids drawn with a fixed seed; decoding is greedy for N new tokens
(the prefill gives the first, then N - 1 one-token steps through the preallocated KV cache).
Each measurement is repeated and the median is kept.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from tfx.bench.train import sync_device, peak_rss_mib
from tfx.calibrate import use_exit
from tfx.nn.early_exit import exit_report, reset_exit_tallies
from tfx.errors import UsageError


@torch.inference_mode()
def decode_once(model, prompt: torch.Tensor, new_tokens: int, autocast,
                step=None) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, generated ids (B, new_tokens)) of one greedy generation;
    `step` makes the one-token calls (default: the model)."""
    step = step if step is not None else model
    device = prompt.device
    B, P = prompt.shape
    state = model.new_state(B, P + new_tokens)
    out = torch.empty(B, new_tokens, dtype=torch.long, device=device)
    sync_device(device)
    start = time.perf_counter()
    with autocast():
        logits, state = model(prompt, state, last=True)
    out[:, 0] = logits[:, -1].argmax(-1)
    sync_device(device)
    prefilled = time.perf_counter()
    with autocast():
        for i in range(1, new_tokens):
            logits, state = step(out[:, i - 1:i], state)
            out[:, i] = logits[:, -1].argmax(-1)
    sync_device(device)
    return prefilled - start, time.perf_counter() - prefilled, out


def bench_generate(run_dir: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, precision: str,
                   device: str, checkpoint: str, log: Callable[[str], None], compile: bool | None = None,
                   exit_threshold: float | None = None) -> dict:
    """The row `tfx bench generate` prints. A CALM run decoding with exits (RUN/exit.json, or
    `exit_threshold` < 1) is also decoded without them, alternately, and the row adds the full
    model's decode tokens/s, the ratio and the mean layers used (agreement: tfx calibrate-exit)."""
    from tfx.decoding.generate import decode_step
    from tfx.families import need_text_lm
    from tfx.rundir import load_run
    from tfx.train.loop import autocast_for, select_device

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    need_text_lm(recipe, "tfx bench generate")
    if new_tokens < 2:
        raise UsageError("--new-tokens: at least 2 (the prefill gives the first)")
    if prompt_len + new_tokens > model.context:
        raise UsageError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = {prompt_len + new_tokens} "
                         f"exceeds the model's context ({model.context})")
    if not model.stack.supports_cache:
        raise UsageError(f"{recipe.model.attention.kind!r} attention has no KV cache to benchmark")
    dev = select_device(device)
    model.to(dev)
    autocast = autocast_for(dev, precision)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tokenizer.vocab_size, (batch, prompt_len), generator=gen).to(dev)
    log(f"bench generate: {run_dir}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, {dev.type} {precision}, "
        f"1 warm-up + {repeats} timed")
    compile = recipe.generate.compile if compile is None else compile
    step = decode_step(model, compile)
    decode_once(model, prompt, new_tokens if compile else min(new_tokens, 8), autocast, step)  # warm-up, compile
    exits = getattr(model, "exits", None)
    use_exit(model, recipe, run_dir, exit_threshold, log)
    threshold = exits.threshold if exits is not None else 1.0
    prefill_s, decode_s, full_s = [], [], []
    for _ in range(repeats):
        if threshold < 1:  # the full model too, alternating with the exits: a ratio from one process
            exits.threshold = 1.0
            _, d, _ = decode_once(model, prompt, new_tokens, autocast, step)
            full_s.append(d)
            exits.threshold = threshold
            reset_exit_tallies(model)
        p, d, _ = decode_once(model, prompt, new_tokens, autocast, step)
        prefill_s.append(p)
        decode_s.append(d)
    prefill, decode = statistics.median(prefill_s), statistics.median(decode_s)
    extra = {}
    if threshold < 1:
        full = statistics.median(full_s)
        report = exit_report(model) or {}
        extra = {"exit_threshold": threshold, "exit_measure": exits.measure,
                 "mean_layers": report.get("mean_layers"), "layers": len(model.stack.blocks),
                 "full_decode_tokens_per_s": batch * (new_tokens - 1) / full,
                 "exit_speedup": full / decode}
    return {
        "run": str(run_dir), "device": dev.type, "precision": precision, "compile": compile,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "prefill_ms": 1000 * prefill, "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_ms_per_token": 1000 * decode / (new_tokens - 1),
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
        "tokens_per_s": batch * new_tokens / (prefill + decode),  # new tokens over the whole generation
        "peak_rss_mib": peak_rss_mib(), **extra,
    }
