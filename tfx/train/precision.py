"""`train.precision`: fp32, bf16 or fp16 autocast, or `auto`, which the machine decides.

bf16 pays where the hardware computes it natively: CUDA devices with bf16 support, and CPUs with
AMX (amx_bf16) or AVX512-BF16 (avx512_bf16). Elsewhere a CPU emulates it and a bf16 step is ~3x
slower than fp32, so a recipe cannot fix the choice: `auto` picks bf16 where native, fp32 otherwise.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from tfx.errors import RunError

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, the reason in words)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {'with' if ok else 'without'} bf16 support"
    if device.type == "cpu":
        found = sorted(set(CPU_BF16_FLAGS) & cpu_flags())
        return (True, f"the CPU has {', '.join(found)}") if found else \
            (False, f"the CPU has neither {' nor '.join(CPU_BF16_FLAGS)}")
    return False, f"no native bf16 known for {device.type}"


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why): `auto` becomes bf16 where the device does it natively, else fp32."""
    if precision != "auto":
        return precision, "set by the recipe"
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), f"auto: {why}"


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory for the forward passes at `precision` (auto resolved for `device`)."""
    precision, _ = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type == "cpu":
        raise RunError("train.precision = 'fp16' needs a GPU; use 'bf16' on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)
