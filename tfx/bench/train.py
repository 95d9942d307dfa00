"""`tfx bench train RECIPE`: the recipe's real training step, timed.

Builds what `tfx train` builds (tokenizer, batches, model, optimizer) in a scratch directory,
runs warm-up steps, then times each step and, apart, the wait for its batch. Model FLOPs come
from torch's FlopCounterMode over one forward and backward pass (every matmul and attention
kernel, attention counted as PaLM's MFU counts it: see step_flops); MFU divides the achieved
FLOP/s by a matmul ceiling measured here, on the same device and at the same precision.
"""
from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from tfx.nn.stack import set_activation_checkpointing

CEILING_SIZE = 2048  # square matmuls for the ceiling: as large as this machine's caches reward


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, precision: str, *, size: int = CEILING_SIZE, seconds: float = 1.0) -> float:
    """Best FLOP/s of repeated (size x size) @ (size x size) matmuls at this precision."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync_device(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync_device(device)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
    return best


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024  # macOS counts bytes


def step_flops(model, micro: list[dict], autocast) -> int:
    """FLOPs of one forward and backward pass over the micro-batches (no optimizer update).
    Model FLOPs, as PaLM's MFU counts them: attention over every (query, key) pair, causal or
    not, and a backward of twice the forward (torch's own formula adds the flash kernels'
    recomputation, and its counter misses SDPA's CPU kernel)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward = lambda q, k, v, *_, **__: fc.sdpa_flop_count(q, k, v)  # noqa: E731
    backward = lambda g, q, k, v, *_, **__: 2 * fc.sdpa_flop_count(q, k, v)  # noqa: E731  (no recompute)
    mapping = {}
    for op in ("flash_attention", "efficient_attention", "cudnn_attention", "flash_attention_for_cpu"):
        if hasattr(aten, f"_scaled_dot_product_{op}"):
            mapping[getattr(aten, f"_scaled_dot_product_{op}")] = forward
            mapping[getattr(aten, f"_scaled_dot_product_{op}_backward")] = backward
    counter = fc.FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        for batch in micro:
            with autocast():
                loss, _, _ = model.loss(batch)
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


PROFILED_STEPS = 10


def profile_steps(run_step: Callable[[], None], device: torch.device, trace: str, log: Callable[[str], None]) -> None:
    """Run PROFILED_STEPS steps under torch.profiler (after the timing, so it never slows the timed
    ones): log a table of the operators with the most self time, write a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            run_step()
            sync_device(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(f"bench train: {PROFILED_STEPS} profiled steps, operators by self time:\n"
        + prof.key_averages().table(sort_by=sort, row_limit=20))
    prof.export_chrome_trace(trace)
    log(f"bench train: trace written to {trace}")


def bench_train(recipe_path: str, *, overrides: list[str], steps: int, warmup: int,
                log: Callable[[str], None], profile: str | None = None) -> dict:
    """Time `steps` training steps after `warmup` untimed ones; returns one result row. With
    `profile` (a path), then profile a few more steps (profile_steps)."""
    from tfx import config as C
    from tfx.data.batching import DataPosition
    from tfx.families import build_model, get_task
    from tfx.registry import OPTIMIZER
    from tfx.run import new_tokenizer
    from tfx.train.loop import TrainStep, select_device
    from tfx.train.precision import autocast_for, resolve_precision

    recipe = C.load_recipe(recipe_path, overrides)
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    precision, why = resolve_precision(cfg.precision, device)
    autocast = autocast_for(device, precision)
    with tempfile.TemporaryDirectory(prefix="tfx-bench-") as scratch:
        run_dir = Path(scratch)
        task = get_task(recipe, run_dir)
        tokenizer = new_tokenizer(recipe, task, run_dir)
        batches, _ = task.prepare(tokenizer)
        torch.manual_seed(cfg.seed)
        model = build_model(recipe, tokenizer=tokenizer, run_dir=run_dir).to(device)
        set_activation_checkpointing(model, cfg.activation_checkpointing)
        optimizer = OPTIMIZER.build(cfg.optimizer, model=model)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        stepper = TrainStep(model, optimizer, cfg=cfg, autocast=autocast, scaler=scaler, device=device)
        it = batches(DataPosition())
        states: list = [None] * cfg.grad_accum
        model.train()

        def next_micro() -> list[dict]:
            return [next(it)[0] for _ in range(cfg.grad_accum)]

        log(f"bench train: {recipe.name} ({recipe.family}), "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, {device.type} {precision} ({why}), "
            f"{warmup} warm-up + {steps} timed steps")
        micro = next_micro()
        flops = step_flops(model, [stepper.to_device(b) for b in micro], autocast)
        flop_tokens = stepper(micro, states)[2]  # the counted batch, trained on as the first warm-up step
        for _ in range(max(0, warmup - 1)):
            stepper(next_micro(), states)
        sync_device(device)
        step_s, data_s, tokens, losses = [], [], 0, []
        for i in range(steps):
            start = time.perf_counter()
            micro = next_micro()
            fetched = time.perf_counter()
            loss_sum, n_tokens, seen = stepper(micro, states)
            sync_device(device)
            end = time.perf_counter()
            step_s.append(end - start)
            data_s.append(fetched - start)
            tokens += seen
            losses.append(float(loss_sum) / n_tokens)  # after the clock: the bench's own host sync
            if (i + 1) % max(1, steps // 5) == 0:
                log(f"bench train: step {i + 1}/{steps}, {1000 * statistics.median(step_s):.0f} ms/step")
        if profile:
            profile_steps(lambda: stepper(next_micro(), states), device, profile, log)
        ceiling = matmul_ceiling(device, precision)
    elapsed = sum(step_s)
    tokens_per_s = tokens / elapsed
    flops_per_token = flops / flop_tokens
    return {
        "recipe": recipe.name, "family": recipe.family, "device": device.type, "precision": precision,
        "precision_source": why,
        "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens / steps, "tokens_per_s": tokens_per_s,
        "ms_per_step": 1000 * statistics.median(step_s), "ms_min": 1000 * min(step_s), "ms_max": 1000 * max(step_s),
        "data_ms": 1000 * statistics.mean(data_s), "data_frac": sum(data_s) / elapsed,
        "flops_per_token": flops_per_token, "achieved_flops": flops_per_token * tokens_per_s,
        "ceiling_flops": ceiling, "mfu": flops_per_token * tokens_per_s / ceiling,
        "peak_rss_mib": peak_rss_mib(),
        "peak_device_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
        "first_loss": losses[0], "last_loss": losses[-1],
    }
