"""The depthwise convolution of `model.ffn = "dwconv"`: local mixing inside the feed-forward.

EfficientViT (Cai et al., 2023) pairs global ReLU linear attention with depthwise convolutions
that bring back local detail: the feed-forward becomes pointwise (d_model -> d_ff), a depthwise
3 x 3 convolution over the patch grid (each of the d_ff channels its own 3 x 3 filter), and
pointwise back (d_ff -> d_model), an activation after each of the first two. On images the
convolution runs over the grid of `spec.grid` (prefix tokens such as [CLS] pass through it
unchanged); on text it is 1-D over the sequence, 3 taps: the token and its two neighbours, or
in a causal stack the token and the two before it, so nothing sees the future. Padded positions
are zeroed first, so they add nothing to real tokens. A position's output depends on the
neighbours' hidden states in the same layer, which a KV cache does not keep: a stack with this
feed-forward generates by recomputing the prefix (TransformerStack.supports_cache).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfx.errors import RunError

TAPS = 3


class DepthwiseMix(nn.Module):
    """A per-channel 3 x 3 (images) or 3-tap (text) convolution over the positions, with a bias."""

    def __init__(self, channels: int, *, two_d: bool):
        super().__init__()
        self.two_d = two_d
        shape = (channels, 1, TAPS, TAPS) if two_d else (channels, 1, TAPS)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # torch's own default for a convolution

    def forward(self, h: Tensor, spec) -> Tensor:
        """(B, T, C) -> (B, T, C), with `spec` (an AttnSpec) giving the grid, causality and padding."""
        if spec.key_padding_mask is not None:
            h = h * spec.key_padding_mask[..., None].to(h.dtype)
        if self.two_d:
            if spec.grid is None:
                raise RunError("the 2-D depthwise feed-forward needs images (family vit)")
            rows, cols, prefix = spec.grid
            B, _, C = h.shape
            grid = h[:, prefix:].transpose(1, 2).reshape(B, C, rows, cols)
            out = F.conv2d(grid, self.weight.to(h.dtype), self.bias.to(h.dtype), padding=TAPS // 2, groups=C)
            return torch.cat([h[:, :prefix], out.flatten(2).transpose(1, 2)], 1)
        x = h.transpose(1, 2)  # (B, C, T)
        x = F.pad(x, (TAPS - 1, 0) if spec.causal else (TAPS // 2, TAPS // 2))
        return F.conv1d(x, self.weight.to(h.dtype), self.bias.to(h.dtype), groups=h.shape[-1]).transpose(1, 2)
