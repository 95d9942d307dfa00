"""Adaptive attention span (Sukhbaatar et al., 2019), an option of the dense and local kernels.

Each head learns a span z in [0, max_span]; the weight of a key at distance x is multiplied by the
soft ramp m(x) = clamp((R + z - x) / R, 0, 1) before the weights are renormalised, which is a bias
of log m(x) on the scores. An L1 penalty on the spans joins the training loss.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.registry import KindConfig


class SpanOptions(KindConfig):
    """Recipe keys shared by the kernels that take an adaptive span."""

    kind: str = ""
    adaptive_span: bool = False
    max_span: int = Field(256, gt=0)        # S: the largest span a head can learn
    span_ramp: int = Field(32, gt=0)        # R: width of the soft edge
    span_init: float = Field(0.0, ge=0.0, le=1.0)  # initial span as a fraction of max_span
    span_penalty: float = Field(2e-6, ge=0.0)  # λ: loss += λ · mean span in tokens, per layer


class AdaptiveSpan(nn.Module):
    def __init__(self, cfg: SpanOptions, n_heads: int):
        super().__init__()
        self.cfg = cfg
        self.z = nn.Parameter(torch.full((n_heads,), float(cfg.span_init)))  # fraction of max_span

    def spans(self) -> Tensor:
        """(H,) learned spans in tokens."""
        return self.z.clamp(0, 1) * self.cfg.max_span

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(1, H, Tq, Tk) log of the soft mask over all pairs."""
        return self.log_mask((q_pos[:, None] - k_pos[None, :])[None])[None]

    def log_mask(self, dist: Tensor) -> Tensor:
        """Signed distances q_pos - k_pos of shape (1|H, ...) -> (H, ...) log of the soft mask,
        -inf where the ramp is zero. A key's distance counts both ways (causality masks the rest)."""
        if self.training:
            self.clamp_()  # the paper clips z after every update; here before every use
        H = self.z.shape[0]
        spans = self.spans().view(H, *([1] * (dist.dim() - 1)))
        R = self.cfg.span_ramp
        ramp = ((R + spans - dist.abs().float()) / R).clamp(0, 1)
        safe = torch.where(ramp > 0, ramp, torch.ones_like(ramp)).log()  # no log(0) in the graph
        return torch.where(ramp > 0, safe, torch.full_like(ramp, float("-inf")))

    def penalty(self) -> Tensor:
        return self.cfg.span_penalty * self.spans().mean()

    def clamp_(self) -> None:
        with torch.no_grad():
            self.z.clamp_(0, 1)
