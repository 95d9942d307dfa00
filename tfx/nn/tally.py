"""Counts that a module keeps while evaluating (a `tally` buffer: how many positions took n steps or
left at layer n), summed over a model's modules of one kind and reported as a mean and a distribution."""
from __future__ import annotations

import torch
from torch import nn


def tally_report(model: nn.Module, kind: type, unit: str) -> dict | None:
    """{"mean_<unit>", "positions", "<unit>": {n: share}} over the `kind` modules' tallies since
    `reset_tallies`, or None for a model without one (or nothing tallied)."""
    tallies = [m.tally for m in model.modules() if isinstance(m, kind)]
    counts = sum(t.cpu() for t in tallies) if tallies else None
    if counts is None or not int(counts.sum()):
        return None
    n = int(counts.sum())
    return {f"mean_{unit}": round(float((counts * torch.arange(len(counts))).sum()) / n, 4), "positions": n,
            unit: {str(k): round(int(c) / n, 4) for k, c in enumerate(counts.tolist()) if c}}


def reset_tallies(model: nn.Module, kind: type) -> None:
    """Start counting afresh (before an evaluation or a timed run)."""
    for m in model.modules():
        if isinstance(m, kind):
            m.tally.zero_()
