"""An exponential moving average of the weights (`train.ema = D`; Polyak averaging as timm's ModelEma
and TensorFlow's ExponentialMovingAverage keep it), for validation and best.safetensors.

After optimizer step t (1, 2, ...) every floating-point parameter p of the model updates its average

    a_t = d_t * a_(t-1) + (1 - d_t) * p_t,    d_t = min(D, (1 + t) / (10 + t)),    a_0 = p_0,

so the first steps, which the average would otherwise remember for ~1/(1-D) steps, fade quickly
(TensorFlow's num_updates ramp). Buffers (running statistics, centroids) and integer tensors are
taken as they are. Training itself never sees the average: the loss curve is that of the same run
without it. Validation runs on the average (swapped in and out exactly), so best.safetensors holds
the best average; model.safetensors keeps the trained weights, and the average travels in the
checkpoint so that a resume continues it bit for bit.
"""
from __future__ import annotations

import contextlib

import torch

PREFIX = "ema."  # the average's tensors in a checkpoint's optim.pt


def averaged(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()


class WeightAverage:
    """The average of `model`'s parameters (by name), kept in float32 beside the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if averaged(p)]
        params = dict(model.named_parameters())
        self.average = {n: params[n].detach().to(torch.float32, copy=True) for n in self.names}

    def factor(self, step: int) -> float:
        """d_t of the module docstring, for the update after optimizer step `step` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        params = dict(model.named_parameters())
        current = [params[n].detach().to(torch.float32) for n in self.names]
        torch._foreach_lerp_([self.average[n] for n in self.names], current, 1.0 - self.factor(step))

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, model: torch.nn.Module):
        """`model` with the average in place of its parameters; the trained ones are put back exactly."""
        params = dict(model.named_parameters())
        kept = {n: params[n].detach().clone() for n in self.names}
        for n in self.names:
            params[n].copy_(self.average[n])
        try:
            yield model
        finally:
            for n in self.names:
                params[n].copy_(kept[n])

    def state(self) -> dict[str, torch.Tensor]:
        return {PREFIX + n: t for n, t in self.average.items()}

    def restore(self, extra: dict) -> bool:
        """Take the average from a checkpoint's tensors; False when the checkpoint has none (it was
        saved without train.ema: the average starts again from the restored weights)."""
        saved = {k.removeprefix(PREFIX): v for k, v in extra.items() if k.startswith(PREFIX)}
        if set(saved) != set(self.names):
            return False
        for n in self.names:
            self.average[n].copy_(saved[n])
        return True
