"""The Vision Transformer (Dosovitskiy et al., 2021): patches -> the shared encoder stack -> a label.

An image (B, C, H, W) is cut into non-overlapping `model.patch` x `model.patch` patches, each
embedded linearly (a convolution with the patch as kernel and stride, which is that linear map),
optionally after a 3 x 3 convolution stem (`model.stem` channels) over the whole image;
with `pool = "cls"` a learned [CLS] vector is put before them and classifies, with `pool =
"mean"` the mean of the patch outputs does. The stack is tfx's TransformerStack, non-causal, fed
the patch embeddings instead of token embeddings, with the patch grid (rows, cols, prefix), so
2-D position schemes (tfx/nn/positions_2d.py) and grid kernels (window attention) see where each
patch is. Images of another size than the training ones give another grid; the position scheme
decides what that means (1-D learned positions stop at the context; 2-D ones interpolate or
compute).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfx.errors import UsageError
from tfx.nn.regularisers import rdrop_loss, twice
from tfx.nn.stack import TransformerStack


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """(rows, cols) of patches of an image; its sides must be multiples of the patch."""
    if height % patch or width % patch:
        raise UsageError(f"model.patch = {patch} does not divide the {height} x {width} images; pick a divisor "
                         f"of both sides")
    return height // patch, width // patch


class VisionTransformer(nn.Module):
    """Image classification: patch embeddings, [CLS] or mean pooling, the encoder stack, a linear head."""

    def __init__(self, cfg, *, channels: int, image_size: tuple[int, int], n_labels: int, rdrop: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.cfg, self.n_labels, self.rdrop, self.channels = cfg, n_labels, rdrop, channels
        self.smoothing = label_smoothing
        if cfg.pool == "pooler":
            raise UsageError('model.pool = "pooler" is BERT\'s text pooler; a vit pools by "cls" or "mean"')
        self.prefix = 1 if cfg.pool == "cls" else 0
        rows, cols = patch_grid(*image_size, cfg.patch)
        if cfg.position.kind == "learned" and rows * cols + self.prefix > cfg.context:
            raise UsageError(f"model.context ({cfg.context}) is shorter than the {rows} x {cols} patches"
                             + (" and [CLS]" if self.prefix else "") + f" ({rows * cols + self.prefix}) that learned "
                             "positions need; raise it")
        # Xiao et al. (2021), "Early convolutions help transformers see better": a convolution over
        # the pixels before the patch embedding gives each patch its neighbours' edges
        self.stem = nn.Sequential(nn.Conv2d(channels, cfg.stem, 3, padding=1, bias=cfg.bias), nn.GELU()) \
            if cfg.stem else None
        self.patches = nn.Conv2d(cfg.stem or channels, cfg.d_model, kernel_size=cfg.patch, stride=cfg.patch, bias=cfg.bias)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if self.prefix else None
        self.encoder = TransformerStack(cfg, vocab_size=0, causal=False, grid=(rows, cols, self.prefix))
        self.head = nn.Linear(cfg.d_model, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, C, H, W) -> (B, prefix + rows * cols, d_model) and the grid (rows, cols, prefix)."""
        if images.shape[1] != self.channels:
            raise UsageError(f"images with {images.shape[1]} channel(s); the model takes {self.channels}")
        rows, cols = patch_grid(images.shape[2], images.shape[3], self.cfg.patch)
        if (rows, cols) != self.encoder.pos.train_grid[:2] and not self.encoder.pos.any_grid:
            raise UsageError(f"images of {images.shape[2]} x {images.shape[3]} pixels: this model was trained on "
                             f"{self.encoder.pos.train_grid[0] * self.cfg.patch} x "
                             f"{self.encoder.pos.train_grid[1] * self.cfg.patch}, and its {self.cfg.position.kind!r} "
                             "positions are defined for that grid only (learned_2d, sinusoidal_2d and rope_2d take "
                             "other sizes)")
        pixels = images if self.stem is None else self.stem(images)
        x = self.patches(pixels).flatten(2).transpose(1, 2)  # (B, rows*cols, d_model), raster order
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        return x, (rows, cols, self.prefix)

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> the pooled (B, d_model) representation."""
        x, grid = self.embed(images)
        h, _ = self.encoder(None, embeds=x, grid=grid)
        return h[:, 0] if self.prefix else h.mean(1)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised pixels -> (B, n_labels) logits."""
        return self.head(self.features(images))

    def loss(self, batch: dict, state=None) -> tuple[Tensor, dict, None]:
        """Summed cross-entropy over the images (label smoothing while training); with R-Drop, while
        training, over two passes."""
        smoothing = self.smoothing if self.training else 0.0
        if self.rdrop and self.training:
            first, second = self(*twice(batch["image"])).chunk(2)
            return rdrop_loss(first, second, batch["label"], self.rdrop, label_smoothing=smoothing), {}, None
        logits = self(batch["image"])
        return F.cross_entropy(logits.float(), batch["label"], reduction="sum", label_smoothing=smoothing), {}, None

    @staticmethod
    def count_tokens(batch: dict) -> int:
        """The loss is per image."""
        return int(batch["label"].numel())

    def input_tokens(self, batch: dict) -> int:
        """Throughput counts patches."""
        images = batch["image"]
        return images.shape[0] * (images.shape[2] // self.cfg.patch) * (images.shape[3] // self.cfg.patch)
