"""Shifted-window attention of the Swin Transformer (Liu et al., 2021, "Swin Transformer:
Hierarchical Vision Transformer using Shifted Windows").

For images only: the stack's spec.grid = (rows, cols, prefix) says the tokens are a rows x cols
grid of patches in raster order, with no [CLS] token (prefix 0; Swin pools the mean). The grid is
cut into windows of window x window patches and every patch attends to the patches of its window
only. In odd layers (layer % 2 == 1, when `shift`) the partition is moved by s = window // 2
patches: the grid is rolled cyclically by -s on both axes, cut into windows, and a mask keeps
apart the patches of a window that were not neighbours before the roll (the regions
[0, P - w), [P - w, P - s), [P - s, P) of each rolled axis of size P); the outputs are rolled
back by +s. Information crosses window borders through these shifted layers.

Grids whose sides are not multiples of the window are padded at the bottom and right to the next
multiple (as Swin does, before the roll); padded patches are masked as keys (Swin's code lets
them in as zero vectors) and their outputs dropped. A window larger than the grid is clipped to
it per axis, and an axis that one window covers is not shifted (Swin turns the shift off when
the window covers the image; rolling such an axis would only cut its window in two).

`relative_bias` adds Swin's learned bias B[h, dy, dx], one table of (2w - 1)^2 entries per head
indexed by the offset of the two patches inside the window, to the scores. It starts at zero
(Swin draws it from a truncated normal of std 0.02), so a new model starts as plain windows.

Computed window by window: the scores are (B, H, nW, w², w²), so time and memory are O(N·w²)
for N patches; no N x N mask or score matrix is built. Bidirectional only, no cache, no key
padding, no additive bias from the stack (the kernel's own table is separate). GQA/MQA by
repeating key and value heads. window_pattern() writes the same pattern out as an (N, N) matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from tfx.errors import RunError
from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.dropout import dropout as fast_dropout
from tfx.registry import ATTENTION, KindConfig

NO_CLS = 'window attention works on a patch grid without a [CLS] token: set model.pool = "mean"'


class WindowConfig(KindConfig):
    kind: str = "window"
    window: int = Field(7, ge=1, description="a window is window x window patches")
    shift: bool = Field(True, description="odd layers shift the windows by window // 2 patches (Swin)")
    relative_bias: bool = Field(False, description="a learned (2·window - 1)^2 relative position bias per head")


@dataclass(frozen=True)
class Layout:
    """How a rows x cols grid is cut: windows of wr x wc, padded to P_r x P_c, rolled by -(sr, sc)."""

    rows: int
    cols: int
    wr: int
    wc: int
    pr: int
    pc: int
    sr: int
    sc: int

    @classmethod
    def of(cls, rows: int, cols: int, window: int, shifted: bool) -> "Layout":
        wr, wc = min(window, rows), min(window, cols)
        s = window // 2 if shifted else 0
        return cls(rows, cols, wr, wc, math.ceil(rows / wr) * wr, math.ceil(cols / wc) * wc,
                   s if rows > window else 0, s if cols > window else 0)

    @property
    def n_windows(self) -> int:
        return (self.pr // self.wr) * (self.pc // self.wc)

    @property
    def plain(self) -> bool:
        """No roll and no padding: every pair inside a window is allowed."""
        return self.sr == self.sc == 0 and self.pr == self.rows and self.pc == self.cols


def _regions(size: int, window: int, shift: int, device) -> Tensor:
    """Region of each position of a rolled axis: the paper's slices [0, P-w), [P-w, P-s), [P-s, P)."""
    p = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(p)
    return (p >= size - window).long() + (p >= size - shift).long()


def _rolled_labels(g: Layout, device) -> tuple[Tensor, Tensor]:
    """For each position of the padded, rolled grid (pr, pc): its region label and whether it holds
    a real patch (not padding)."""
    label = _regions(g.pr, g.wr, g.sr, device)[:, None] * 3 + _regions(g.pc, g.wc, g.sc, device)[None, :]
    r = (torch.arange(g.pr, device=device) + g.sr) % g.pr  # the unrolled row held at each rolled row
    c = (torch.arange(g.pc, device=device) + g.sc) % g.pc
    real = (r < g.rows)[:, None] & (c < g.cols)[None, :]
    return label, real  # (pr, pc) each


def to_windows(x: Tensor, g: Layout) -> Tensor:
    """(B, H, rows·cols, D) in raster order -> (B, H, nW, wr·wc, D): pad, roll, cut into windows."""
    B, H, _, D = x.shape
    x = x.reshape(B, H, g.rows, g.cols, D)
    x = F.pad(x, (0, 0, 0, g.pc - g.cols, 0, g.pr - g.rows))  # (B, H, pr, pc, D)
    if g.sr or g.sc:
        x = torch.roll(x, shifts=(-g.sr, -g.sc), dims=(2, 3))
    x = x.view(B, H, g.pr // g.wr, g.wr, g.pc // g.wc, g.wc, D).transpose(3, 4)  # (B, H, nR, nC, wr, wc, D)
    return x.reshape(B, H, g.n_windows, g.wr * g.wc, D)


def from_windows(x: Tensor, g: Layout) -> Tensor:
    """The inverse of to_windows: (B, H, nW, wr·wc, D) -> (B, H, rows·cols, D), padding dropped."""
    B, H, _, _, D = x.shape
    x = x.view(B, H, g.pr // g.wr, g.pc // g.wc, g.wr, g.wc, D).transpose(3, 4)  # (B, H, nR, wr, nC, wc, D)
    x = x.reshape(B, H, g.pr, g.pc, D)
    if g.sr or g.sc:
        x = torch.roll(x, shifts=(g.sr, g.sc), dims=(2, 3))
    return x[:, :, : g.rows, : g.cols].reshape(B, H, g.rows * g.cols, D)


def _cut(x: Tensor, g: Layout) -> Tensor:
    """A (pr, pc) map of the rolled, padded grid -> (nW, wr·wc), in to_windows' window order."""
    x = x.view(g.pr // g.wr, g.wr, g.pc // g.wc, g.wc).transpose(1, 2)  # (nR, nC, wr, wc)
    return x.reshape(g.n_windows, g.wr * g.wc)


def window_mask(g: Layout, device) -> Tensor | None:
    """(nW, w², w²) bool, True = attend: same region of the roll, and a real key (a padded query
    keeps itself, so that no row is empty); None when every pair inside a window is allowed."""
    if g.plain:
        return None
    label, real = (_cut(x, g) for x in _rolled_labels(g, device))  # (nW, w²) each
    same = label[:, :, None] == label[:, None, :]
    eye = torch.eye(g.wr * g.wc, dtype=torch.bool, device=device)
    return same & (real[:, None, :] | eye)


def window_pattern(rows: int, cols: int, window: int, shifted: bool) -> Tensor:
    """(N, N) bool over the rows·cols patches in raster order: True where the kernel lets patch i
    attend to patch j, i.e. both lie in one window of the (shifted, cyclic) partition and, when
    shifted, in one region of the roll's mask. For oracle tests; the kernel never builds it."""
    g = Layout.of(rows, cols, window, shifted)
    r = (torch.arange(rows) - g.sr) % g.pr  # rolled row of each patch row
    c = (torch.arange(cols) - g.sc) % g.pc
    region_r, region_c = _regions(g.pr, g.wr, g.sr, None)[r], _regions(g.pc, g.wc, g.sc, None)[c]
    win = ((r // g.wr)[:, None] * (g.pc // g.wc) + (c // g.wc)[None, :]).flatten()  # (N,)
    label = (region_r[:, None] * 3 + region_c[None, :]).flatten()  # (N,)
    return (win[:, None] == win[None, :]) & (label[:, None] == label[None, :])


def relative_index(wr: int, wc: int, window: int) -> Tensor:
    """(wr·wc, wr·wc) index into a (2·window - 1)^2 table of the offset (dy, dx) between two
    positions of a wr x wc window."""
    y, x = torch.meshgrid(torch.arange(wr), torch.arange(wc), indexing="ij")
    y, x = y.flatten(), x.flatten()  # (w²,) each, raster order inside the window
    dy = y[:, None] - y[None, :] + window - 1
    dx = x[:, None] - x[None, :] + window - 1
    return dy * (2 * window - 1) + dx


@ATTENTION.register("window", config=WindowConfig)
class WindowAttention(AttentionKernel):
    """Swin's (shifted) window attention over an image's patch grid (Liu et al., 2021)."""

    # Exact against window_pattern() (tests/test_window_attention.py), but allowed() cannot give
    # the pattern from 1-D positions alone (it needs the grid), so the generic exact harness
    # (tests/test_attn_exact.py) cannot run this kind: it is not declared exact there.
    exact = False
    supports_causal = False
    supports_cache = False
    supports_bias = False
    supports_padding = False
    complexity = "O(N·w²)"
    needs_grid = True

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.window = cfg.window
        self.shifted = cfg.shift and self.layer % 2 == 1
        w = 2 * cfg.window - 1
        self.table = nn.Parameter(torch.zeros(self.n_heads, w * w)) if cfg.relative_bias else None  # (H, (2w-1)^2)

    @staticmethod
    def check_recipe(cfg, model) -> list[str]:
        """Recipe-time refusals beyond the capability flags (called by tfx.kinds.problems)."""
        return [NO_CLS] if getattr(model, "pool", "mean") == "cls" else []

    def grid_of(self, spec: AttnSpec, q: Tensor, k: Tensor) -> tuple[int, int]:
        """The (rows, cols) patch grid of the input, or a RunError that says what is wrong."""
        if spec.grid is None:
            raise RunError("window attention needs images (family vit): it attends within windows of "
                           "a patch grid, and this input is a sequence")
        rows, cols, prefix = spec.grid
        if prefix:
            raise RunError(NO_CLS)
        if spec.causal or spec.key_padding_mask is not None or spec.bias is not None or spec.explicit_only:
            raise RunError("window attention is bidirectional over whole images: it takes no causal mask, "
                           "key padding, score bias, relative values or score scaling")
        if not q.shape[2] == k.shape[2] == rows * cols:
            raise RunError(f"window attention needs the {rows} x {cols} = {rows * cols} patches as both "
                           f"queries and keys; got {q.shape[2]} queries and {k.shape[2]} keys")
        return rows, cols

    def allowed(self, q_pos: Tensor, k_pos: Tensor, grid: tuple[int, int, int] | None = None) -> Tensor:
        """The (N, N) pattern of this layer on `grid` (see window_pattern); positions alone do not
        say which patches neighbour each other."""
        if grid is None or grid[2]:
            raise RunError("window attention's pattern depends on the patch grid: pass grid=(rows, cols, 0)")
        return window_pattern(grid[0], grid[1], self.window, self.shifted).to(q_pos.device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        rows, cols = self.grid_of(spec, q, k)
        g = Layout.of(rows, cols, self.window, self.shifted)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)  # (B, H, N, D)
        v = v.repeat_interleave(rep, dim=1)  # (B, H, N, D)
        qw, kw, vw = (to_windows(t, g) for t in (q, k, v))  # (B, H, nW, w², D)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (qw * (1.0 / math.sqrt(q.shape[-1]))) @ kw.transpose(-1, -2)  # (B, H, nW, w², w²)
        scores = scores.to(acc)
        if self.table is not None:
            index = relative_index(g.wr, g.wc, self.window).to(q.device)
            scores = scores + self.table[:, index][:, None].to(acc)  # (H, 1, w², w²)
        mask = window_mask(g, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # every row keeps at least itself
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout:
            weights = fast_dropout(weights, self.dropout)
        out = weights.to(v.dtype) @ vw  # (B, H, nW, w², D)
        return from_windows(out, g)  # (B, H, N, D)
