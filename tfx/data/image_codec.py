"""The vision family's "tokenizer": images (uint8 H x W x C) to normalised float tensors.

A run's tokenizer directory is what turns its inputs into model inputs; for images that is the
size and channel count the model was built for and the per-channel mean and standard deviation of
the training pixels (fitted when the run starts, like a tokenizer is trained), saved in
RUN/tokenizer/tokenizer.json. It has no vocabulary (vocab_size 0) and does not encode text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tfx.data.tokenizers import Tokenizer
from tfx.registry import TOKENIZER, KindConfig


class ImageConfig(KindConfig):
    """Images: the pixels scaled to [0, 1], then standardised per channel with the training set's
    mean and standard deviation (`normalise = false`: only the scaling)."""

    kind: Literal["image"] = "image"
    normalise: bool = True
    # pixels each training image's sides may be shifted by (random crop of the image padded by this
    # many zero pixels; 0: none) and whether it is mirrored left-right with probability 1/2
    shift: int = Field(0, ge=0)
    flip: bool = False


@TOKENIZER.register("image", config=ImageConfig)
class ImageCodec(Tokenizer):
    kind = "image"
    vocab_size = 0

    def __init__(self, config: ImageConfig, *, height: int, width: int, channels: int,
                 mean: list[float], std: list[float]):
        super().__init__(config)
        self.height, self.width, self.channels = height, width, channels
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    @classmethod
    def train(cls, cfg: ImageConfig, images) -> "ImageCodec":
        """Fit on an ImageSet (or a uint8 (N, H, W, C) array): its size, channels, mean and std."""
        array = getattr(images, "images", images)
        n, h, w, c = array.shape
        if not cfg.normalise:
            return cls(cfg, height=h, width=w, channels=c, mean=[0.0] * c, std=[1.0] * c)
        pixels = array.reshape(-1, c)
        mean = np.zeros(c)
        square = np.zeros(c)
        for i in range(0, len(pixels), 1 << 22):  # chunks: no float copy of the whole set
            chunk = pixels[i:i + (1 << 22)].astype(np.float64) / 255.0
            mean += chunk.sum(0)
            square += (chunk ** 2).sum(0)
        mean /= len(pixels)
        std = np.sqrt(np.maximum(square / len(pixels) - mean ** 2, 1e-12))
        return cls(cfg, height=h, width=w, channels=c, mean=mean.tolist(), std=std.tolist())

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the images the run's model was built for."""
        return self.height, self.width

    def tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float32 (N, C, H, W), scaled and standardised."""
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div_(255.0)  # a copy: a view may be read-only
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def check(self, shape: tuple[int, ...], where: str) -> None:
        """Refuse images whose channel count differs from the run's (ValueError naming `where`)."""
        if shape[-1] != self.channels:
            raise ValueError(f"{where}: images with {shape[-1]} channel(s); this run was trained on "
                             f"{self.channels}-channel images")

    def encode(self, text: str) -> list[int]:
        raise ValueError("an image run's tokenizer does not encode text")

    def decode(self, ids) -> str:
        raise ValueError("an image run's tokenizer does not decode ids")

    def _spec(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "channels": self.channels, "mean": self.mean,
                "std": self.std}

    @classmethod
    def _load(cls, cfg: ImageConfig, spec: dict[str, Any], directory: Path) -> "ImageCodec":
        return cls(cfg, height=int(spec["height"]), width=int(spec["width"]), channels=int(spec["channels"]),
                   mean=list(spec["mean"]), std=list(spec["std"]))

    def __repr__(self) -> str:
        return f"ImageCodec({self.height}x{self.width}x{self.channels})"


def run_codec(run_dir: Path) -> ImageCodec:
    """The ImageCodec saved in a run directory (what an image family's model builder reads)."""
    from tfx.data.tokenizers import load_tokenizer
    from tfx.rundir.files import TOKENIZER

    return load_tokenizer(Path(run_dir) / TOKENIZER)
