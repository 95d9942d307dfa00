"""Depth in the Universal Transformer way (`[model.depth] kind = "universal"`; Dehghani et al., 2019),
with Adaptive Computation Time per position (Graves, 2016).

The stack's `n_layers` blocks form one step, and the same step (shared weights) is applied up to
`max_steps` times; before each step a signal for that step is added to the state. The paper's is
sinusoidal, added to embeddings scaled by sqrt(d_model); tfx's token embeddings are unscaled (std
0.02) for most position schemes, where a sinusoid of order 1 would drown them, so the signal is a
learned vector per step at the embeddings' scale. With `act = true` a halting unit p = sigmoid(w . h + b) reads each position's state h^n after
step n, and position i stops at the first step N where p^1 + ... + p^N >= 1 - halt_epsilon (or at
max_steps). Its output is ACT's weighted sum

    y = sum_{n < N} p^n h^n + R h^N,    R = 1 - sum_{n < N} p^n  (the remainder),

and from step N on its state stays y: the later steps still read it (their attention sees every
position, and a KV cache gets every step's keys for every token, so cached decoding equals the
parallel forward), but never change it. The ponder cost N + R, averaged over the real positions
and scaled by `ponder_cost`, is a training penalty (its gradient reaches the halting unit through R).
With `act = false` every position takes max_steps steps: the block unrolled, y = h^max_steps.

Every step runs every position (as the paper's implementation does): ACT decides what each position's
output is, not how much is computed. In evaluation the steps each position took are tallied for
`tfx eval` (`depth_report`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from tfx.nn.tally import reset_tallies, tally_report


class UniversalDepth(nn.Module):
    """The recurrence in depth and its halting; `forward(x, step)` runs `step(n, state)` (one pass
    over the shared blocks for step n) up to max_steps times."""

    def __init__(self, cfg, d_model: int):
        super().__init__()
        self.max_steps, self.act, self.eps, self.cost = cfg.max_steps, cfg.act, cfg.halt_epsilon, cfg.ponder_cost
        self.halt = nn.Linear(d_model, 1) if cfg.act else None
        self.timestep = nn.Parameter(torch.zeros(cfg.max_steps, d_model))  # one learned signal per step
        self.penalty: Tensor | None = None  # the last training forward's ponder cost
        self.register_buffer("tally", torch.zeros(cfg.max_steps + 1, dtype=torch.long), persistent=False)  # in eval

    def reset_parameters(self) -> None:
        """Step signals at the token embeddings' scale (N(0, 0.02)); a halting bias of 1 (Graves'
        suggestion, so halting starts late) and small halting weights."""
        nn.init.normal_(self.timestep, std=0.02)
        if self.halt is not None:
            nn.init.normal_(self.halt.weight, std=0.02)
            nn.init.constant_(self.halt.bias, 1.0)

    def forward(self, x: Tensor, step: Callable[[int, Tensor], Tensor], real: Tensor | None = None) -> Tensor:
        """(B, T, d) input -> (B, T, d) output. `real` (B, T) marks the positions the ponder cost and
        the tally count (default all)."""
        B, T, d = x.shape
        signal = lambda n: self.timestep[n].to(x.dtype)  # noqa: E731
        state = x
        if self.halt is None:
            for n in range(self.max_steps):
                state = step(n, state + signal(n))
            self.record(torch.full((B, T), float(self.max_steps), device=x.device), None, real)
            return state
        total = x.new_zeros(B, T)  # sum of p over the steps before halting
        remainder = x.new_zeros(B, T)
        steps = x.new_zeros(B, T)
        halted = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        out = torch.zeros_like(x)
        for n in range(self.max_steps):
            h = step(n, state + signal(n))
            p = torch.sigmoid(self.halt(h)).squeeze(-1).to(x.dtype)  # (B, T)
            running = ~halted
            stops = running & ((total + p >= 1 - self.eps) | (n == self.max_steps - 1))
            weight = torch.where(stops, 1 - total, p) * running
            out = out + weight[..., None] * h
            remainder = torch.where(stops, 1 - total, remainder)
            steps = steps + running.to(x.dtype)
            total = total + torch.where(running & ~stops, p, torch.zeros_like(p))
            halted = halted | stops
            state = torch.where(halted[..., None], out, h)  # a halted position keeps its output
        self.record(steps, remainder, real)
        return out

    def record(self, steps: Tensor, remainder: Tensor | None, real: Tensor | None) -> None:
        """The ponder cost (training) or the tally of steps (evaluation)."""
        real = torch.ones_like(steps, dtype=torch.bool) if real is None else real
        if self.training:
            self.penalty = None if remainder is None or not self.cost else \
                self.cost * (steps + remainder)[real].float().mean()
        else:
            # positions per step count, on the device: no host sync per forward (a decode step is one)
            self.tally += torch.bincount(steps[real].round().long().flatten(), minlength=self.max_steps + 1)

    def aux_loss(self) -> Tensor | None:
        """The ponder cost of the last training forward, per token (taken once)."""
        penalty, self.penalty = self.penalty, None
        return penalty if self.training else None


def depth_report(model: nn.Module) -> dict | None:
    """Steps per position of the model's UniversalDepth modules since `reset_depth_tallies`, or None."""
    return tally_report(model, UniversalDepth, "steps")


def reset_depth_tallies(model: nn.Module) -> None:
    reset_tallies(model, UniversalDepth)
