"""Masked image modelling (SimMIM, Xie et al., 2022): a ViT encoder learns by reconstructing the
pixels of the patches it cannot see.

A fraction `train.mask_prob` of each image's patches has its embedding replaced by one learned
[MASK] vector (positions are still added, so the encoder knows where each hidden patch is); the
encoder reads every patch (SimMIM, not MAE's visible-only encoder, so the same stack and attention
kinds serve both), and a linear head maps each masked patch's output to its patch x patch x C
pixels. The loss is the mean squared error of the standardised pixels over the masked patches only.
The patch embedding, [CLS] and encoder have the vit classifier's names and shapes, so `init_from`
starts a classifier from them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tfx.errors import UsageError
from tfx.models.vit import VisionTransformer


def patch_pixels(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, rows * cols, patch * patch * C): each patch's pixels, raster order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


class MaskedImageModel(VisionTransformer):
    """A VisionTransformer whose head predicts the pixels of masked patches instead of a label."""

    def __init__(self, cfg, *, channels: int, image_size: tuple[int, int]):
        if cfg.stem:
            raise UsageError("model.stem: a convolution over the pixels lets each visible patch see the edge of "
                             "its masked neighbours, which masked image modelling must hide; set model.stem = 0")
        super().__init__(cfg, channels=channels, image_size=image_size, n_labels=1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(cfg.d_model, cfg.patch * cfg.patch * channels)  # replaces the label head
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def reconstruct(self, images: Tensor, masked: Tensor) -> Tensor:
        """(B, C, H, W) images and (B, rows * cols) bool masked patches -> predicted pixels of every
        patch (B, rows * cols, patch * patch * C)."""
        x, grid = self.embed(images)
        patches = x[:, self.prefix:]
        patches = torch.where(masked[..., None], self.mask_token.to(x.dtype), patches)
        x = torch.cat([x[:, :self.prefix], patches], 1)
        h, _ = self.encoder(None, embeds=x, grid=grid)
        return self.head(h[:, self.prefix:])

    def forward(self, images: Tensor, masked: Tensor) -> Tensor:
        return self.reconstruct(images, masked)

    def loss(self, batch: dict, state=None) -> tuple[Tensor, dict, None]:
        """The squared error per masked patch (mean over its pixels), summed over the masked patches."""
        masked = batch["masked"]
        predicted = self.reconstruct(batch["image"], masked)[masked]  # (M, P)
        target = patch_pixels(batch["image"], self.cfg.patch)[masked]
        dtype = torch.promote_types(predicted.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        return ((predicted.to(dtype) - target.to(dtype)) ** 2).mean(-1).sum(), {}, None

    @staticmethod
    def count_tokens(batch: dict) -> int:
        """The loss is per masked patch."""
        return int(batch["masked"].sum())
