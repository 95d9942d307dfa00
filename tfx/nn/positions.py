"""Position schemes, each with four hooks (identity / None where unused):

- ``embed(x, pos)``: added to the token embeddings (sinusoidal, learned);
- ``rotate(q, k, q_pos, k_pos)``: applied to queries and keys before the cache (rope);
- ``bias(q_pos, k_pos)``: an additive (1, H, Tq, Tk) score bias from positions only, computed once
  per forward by the stack (alibi, t5);
- ``adjust(q, spec, layer)``: per layer, after the cache, for schemes whose scores depend on the
  query or on per-layer parameters (shaw, xl, da in relative.py): returns the query and the spec
  with their bias, relative values or distance scaling.

Positions are absolute token indices, so a KV cache or a memory needs no special case.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from tfx.errors import RunError
from tfx.registry import POSITION, KindConfig


class PositionScheme(nn.Module):
    """Base: every hook is the identity. `max_len` is the training context."""

    uses_bias = False        # adds a score bias (static or from adjust): needs supports_bias
    needs_score_mods = False  # adjust sets rel_values / score_scale: needs supports_score_mods
    extrapolates = True      # defined for positions past max_len
    relative = False         # only distances matter (memory before a segment, sinks re-positioned in a cache)
    any_grid = False         # images: defined on a patch grid of another size than the training one
    images_only = False      # defined on a patch grid only (the 2-D schemes): refused for text families
    learns_in_attention = False  # has weights used inside attention (bias, adjust): reversible layers refuse it

    def __init__(self, cfg, *, d_model: int, d_head: int, n_heads: int, max_len: int, causal: bool,
                 n_layers: int = 1, grid: tuple[int, int, int] | None = None):
        """`grid`: the training images' (rows, cols, prefix) patch grid (see AttnSpec.grid), None for text."""
        super().__init__()
        self.cfg = cfg
        self.d_model, self.d_head, self.n_heads = d_model, d_head, n_heads
        self.max_len, self.causal, self.n_layers = max_len, causal, n_layers
        self.train_grid = self.grid = grid

    def use_grid(self, grid: tuple[int, int, int] | None) -> None:
        """Called by the stack before a pass over images with their (rows, cols, prefix) grid: a 2-D
        scheme places positions (absolute indices, raster order after the prefix) on it."""
        self.grid = grid

    def ensure(self, length: int) -> None:
        """Called once per forward with the largest position + 1 (a Python int, no host sync)."""

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        return None

    def adjust(self, q: Tensor, spec, layer: int):
        return q, spec


class NoneConfig(KindConfig):
    kind: str = "none"


@POSITION.register("none", config=NoneConfig)
class NoPositions(PositionScheme):
    """No position information (a causal decoder can still infer order; Haviv et al. 2022)."""

    relative = True
    any_grid = True


class SinusoidalConfig(KindConfig):
    kind: str = "sinusoidal"
    base: float = 10000.0
    # interleaved: sin on even features, cos on odd (the paper); halves: all sines, then all cosines (Marian)
    layout: Literal["interleaved", "halves"] = "interleaved"


def sinusoid_table(pos: Tensor, dim: int, base: float, layout: str = "interleaved") -> Tensor:
    """(T, dim) table: sin on even features, cos on odd, frequencies base^(-2i/dim); `halves`: the
    sines in the first dim/2 features and the cosines after them (computed in float64)."""
    if layout == "halves":  # in float64, as Marian's table is computed (then float32)
        inv = base ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64) / dim)
        angles = pos.double()[:, None] * inv[None, :]
        return torch.cat([torch.sin(angles[:, : dim // 2]), torch.cos(angles[:, : dim - dim // 2])], dim=-1).float()
    inv = torch.exp(torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) * (-math.log(base) / dim))
    angles = pos.float()[:, None] * inv[None, :]  # (T, dim/2)
    table = torch.zeros(pos.shape[0], dim, device=pos.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


@POSITION.register("sinusoidal", config=SinusoidalConfig)
class Sinusoidal(PositionScheme):
    """Fixed sinusoidal absolute positions added to the embeddings (Vaswani et al., 2017).

    As in the paper, token embeddings are multiplied by sqrt(d_model) first: the table's entries
    are of order 1, and unscaled embeddings (std 0.02) would drown in it.
    """

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        table = sinusoid_table(pos, self.d_model, self.cfg.base, self.cfg.layout)
        return x * math.sqrt(self.d_model) + table.to(x.dtype)


class LearnedConfig(KindConfig):
    kind: str = "learned"


@POSITION.register("learned", config=LearnedConfig)
class Learned(PositionScheme):
    """A learned embedding per absolute position (GPT-2); undefined past the training context."""

    extrapolates = False

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.table = nn.Embedding(self.max_len, self.d_model)

    def ensure(self, length: int) -> None:
        if length > self.max_len:
            raise RunError(f"learned positions stop at the context ({self.max_len}); got position {length - 1}")

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.table(pos)


class RopeConfig(KindConfig):
    kind: str = "rope"
    base: float = 10000.0


@POSITION.register("rope", config=RopeConfig)
class Rope(PositionScheme):
    """Rotary embeddings: rotate q and k by position-dependent angles (Su et al., 2021).

    Uses the half-split pairing (feature i with i + D/2), as GPT-NeoX and LLaMA do.
    """

    relative = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        if self.d_head % 2:
            raise RunError(f"rope needs an even d_head, got {self.d_head}")
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.ensure(self.max_len)

    def ensure(self, length: int) -> None:
        if self.cos.shape[0] >= length:
            return
        n = max(length, 2 * self.cos.shape[0])
        half = self.d_head // 2
        inv = self.cfg.base ** (-torch.arange(0, half, dtype=torch.float64, device=self.cos.device) / half)
        angles = torch.arange(n, dtype=torch.float64, device=self.cos.device)[:, None] * inv[None, :]  # (n, D/2)
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        cos = self.cos[pos].to(x.dtype)  # (T, D/2)
        sin = self.sin[pos].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        return self._rotate(q, q_pos), self._rotate(k, k_pos)


class AlibiConfig(KindConfig):
    kind: str = "alibi"


def alibi_slopes(n_heads: int) -> Tensor:
    """Geometric head slopes 2^(-8i/n); for a non-power-of-two n, interleave the next power's."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    lower = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(power_of_two(lower) + extra)


@POSITION.register("alibi", config=AlibiConfig)
class Alibi(PositionScheme):
    """Attention with linear biases: score -= slope_h * distance (Press et al., 2022)."""

    relative = True
    uses_bias = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.register_buffer("slopes", alibi_slopes(self.n_heads), persistent=False)

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        dist = (q_pos[:, None] - k_pos[None, :]).float()  # (Tq, Tk)
        dist = dist if self.causal else dist.abs()
        return -(self.slopes[:, None, None] * dist)[None]  # (1, H, Tq, Tk)
