"""2-D position schemes for images (the vit family): learned_2d, sinusoidal_2d, rope_2d.

The stack sees `prefix` tokens (0 or 1: a [CLS] token) then a rows x cols grid of patches in raster
order. Positions stay absolute 1-D indices p: p < prefix is a prefix token, otherwise the patch
i = p - prefix sits at row i // cols, column i % cols of the current grid (`use_grid`, called by
the stack before every pass; `train_grid` is the grid the model was built for).

These schemes are defined for images only: `images_only = True` marks them, and each raises a
RunError when a pass has no grid (text).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfx.errors import RunError
from tfx.nn.positions import PositionScheme, sinusoid_table
from tfx.registry import POSITION, KindConfig


class GridScheme(PositionScheme):
    """Shared by the 2-D schemes: the current grid, and where each position lies on it."""

    images_only = True  # text families should refuse these kinds (tfx.kinds)
    any_grid = True     # defined on grids of other sizes than the training one (learned_2d interpolates)
    relative = False  # a patch's (row, col) is not a function of index distances; see Rope2d

    def current(self) -> tuple[int, int, int]:
        """The current (rows, cols, prefix); a RunError for a pass without images."""
        if self.grid is None:
            raise RunError(f"position kind {self.cfg.kind!r} needs images (family vit): "
                           f"a pass over text has no (rows, cols) patch grid")
        return self.grid

    def ensure(self, length: int) -> None:
        rows, cols, prefix = self.current()
        if length > prefix + rows * cols:
            raise RunError(f"{self.cfg.kind}: position {length - 1} is past the {rows}x{cols} grid "
                           f"and its {prefix} prefix token(s)")

    def coords(self, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(T,) positions -> (row, col, is_prefix), each (T,); prefix tokens get row = col = 0."""
        rows, cols, prefix = self.current()
        i = (pos - prefix).clamp(min=0)
        return i // cols, i % cols, pos < prefix


# --- learned_2d --------------------------------------------------------------------------------

class Learned2dConfig(KindConfig):
    kind: str = "learned_2d"


def resize_table(table: Tensor, rows: int, cols: int) -> Tensor:
    """A (R, C, d) table resized to (rows, cols, d) by bicubic interpolation (align_corners=False),
    as DeiT and timm resize ViT position embeddings; the same size returns the table itself."""
    if table.shape[:2] == (rows, cols):
        return table
    work = table if table.dtype in (torch.float32, torch.float64) else table.float()
    out = F.interpolate(work.permute(2, 0, 1)[None], size=(rows, cols), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).to(table.dtype)  # (rows, cols, d)


@POSITION.register("learned_2d", config=Learned2dConfig)
class Learned2d(GridScheme):
    """A learned embedding per patch of the training grid, plus one per prefix token ([CLS]),
    added to the patch embeddings (ViT, Dosovitskiy et al. 2021).

    The table is (rows, cols, d_model) for the training images' grid, initialised N(0, 0.02) like
    the 1-D learned table. Images of another size get the table resized by bicubic interpolation
    over (rows, cols) (DeiT / timm); the prefix vectors are kept. The parameters keep their shape,
    so a checkpoint loads whatever the images' size.
    """

    extrapolates = True  # other grids interpolate the table

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        if self.train_grid is None:
            raise RunError("learned_2d is a position scheme for images (family vit): it needs the training "
                           "images' patch grid, and a text model has none; use learned for text")
        rows, cols, prefix = self.train_grid
        self.table = nn.Parameter(torch.empty(rows, cols, self.d_model).normal_(std=0.02))
        self.prefix = nn.Parameter(torch.empty(prefix, self.d_model).normal_(std=0.02)) if prefix else None

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        rows, cols, prefix = self.current()
        if prefix != self.train_grid[2]:
            raise RunError(f"learned_2d was trained with {self.train_grid[2]} prefix token(s), got {prefix}")
        patches = resize_table(self.table, rows, cols).reshape(rows * cols, self.d_model)
        full = patches if self.prefix is None else torch.cat([self.prefix, patches])  # (prefix + R*C, d)
        return x + full[pos].to(x.dtype)


# --- sinusoidal_2d -----------------------------------------------------------------------------

class Sinusoidal2dConfig(KindConfig):
    kind: str = "sinusoidal_2d"
    base: float = 10000.0


@POSITION.register("sinusoidal_2d", config=Sinusoidal2dConfig)
class Sinusoidal2d(GridScheme):
    """Fixed 2-D sine-cosine positions added to the patch embeddings (MAE, He et al. 2022).

    For the patch at (r, c): the first d_model/2 features are the 1-D sinusoidal table of r, the
    last d_model/2 that of c (each: sin on even features, cos on odd, frequencies
    base^(-2i/(d_model/2))); prefix tokens get zeros. MAE lays out each 1-D table as [sin | cos]
    and puts the column first: a fixed permutation of the features, equivalent for the model.
    Unlike the 1-D `sinusoidal`, x is not scaled by sqrt(d_model): patch embeddings are a linear
    projection of pixels, not a small-std table. Defined for any grid.
    """

    extrapolates = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        if self.d_model % 4:
            raise RunError(f"sinusoidal_2d needs d_model divisible by 4 (sin and cos for rows and for "
                           f"columns), got {self.d_model}")

    def table(self, pos: Tensor) -> Tensor:
        """(T, d_model): concat(1-D table at row, 1-D table at col), zeros for prefix tokens."""
        row, col, is_prefix = self.coords(pos)
        half = self.d_model // 2
        out = torch.cat([sinusoid_table(row, half, self.cfg.base), sinusoid_table(col, half, self.cfg.base)], -1)
        return out.masked_fill(is_prefix[:, None], 0.0)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.table(pos).to(x.dtype)


# --- rope_2d -----------------------------------------------------------------------------------

class Rope2dConfig(KindConfig):
    kind: str = "rope_2d"
    base: float = 10000.0


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (j, j + n/2) of x's last dimension n by angles with (T, n/2) cos and sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@POSITION.register("rope_2d", config=Rope2dConfig)
class Rope2d(GridScheme):
    """Axial 2-D rotary embeddings: the first half of each head is rotated by the patch's row, the
    second half by its column (RoPE-Axial, Heo et al. 2024, "Rotary Position Embedding for Vision
    Transformer").

    Inside each half of size D/2, feature j pairs with j + D/4 (the half-split pairing of the 1-D
    `rope`) and turns by index * base^(-k/(D/4)), k = 0..D/4-1. So a patch-patch score depends only
    on (row difference, column difference). Prefix tokens are not rotated. Defined for any grid.

    `relative` is False: in tfx it means that scores depend only on differences of the 1-D index
    (so a memory or a sink cache may be re-positioned), which is not so here: shifting every index
    by s moves patches to other (row, col) unevenly (across row ends), and a prefix token, which is
    not rotated, scores against a patch's absolute (row, col).
    """

    extrapolates = True

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        if self.d_head % 4:
            raise RunError(f"rope_2d needs d_head divisible by 4 (a rotated half for rows and one for "
                           f"columns), got {self.d_head}")
        self.register_buffer("trig", torch.empty(0), persistent=False)  # (4, N, D/4), for `made_for`
        self.made_for: tuple | None = None

    def tables(self) -> Tensor:
        """(4, prefix + rows*cols, D/4): cos and sin of the row angles, then of the column angles,
        for every position of the current grid (zero angles for prefix tokens); kept per grid."""
        grid, device = self.current(), self.trig.device  # the buffer follows the module's device
        if self.made_for != (grid, device):
            rows, cols, prefix = grid
            quarter = self.d_head // 4
            inv = self.cfg.base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
            row, col, is_prefix = self.coords(torch.arange(prefix + rows * cols, device=device))
            keep = (~is_prefix).double()[:, None]
            a_row, a_col = (idx.double()[:, None] * inv[None] * keep for idx in (row, col))  # (N, D/4)
            self.trig = torch.stack([a_row.cos(), a_row.sin(), a_col.cos(), a_col.sin()])
            self.made_for = (grid, device)
        return self.trig

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        cr, sr, cc, sc = self.tables()[:, pos].to(x.dtype)
        x_row, x_col = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat((rotate_half(x_row, cr, sr), rotate_half(x_col, cc, sc)), dim=-1)

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        return self._rotate(q, q_pos), self._rotate(k, k_pos)
