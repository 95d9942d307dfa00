"""The masked-image-modelling task (family mim): images in shuffled batches, a seeded choice of
masked patches per image, the reconstruction loss on the masked patches."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from tfx.errors import UsageError
from tfx.tasks.common import EvalOptions, GenerateSettings, log
from tfx.tasks.vit import EVAL_BATCH, ImageTask

VALID_SEED = 20_231_119  # validation masks: the same patches at every validation


def mask_patches(batch: int, n_patches: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, n_patches) bool: round(fraction * n) patches per image (at least one), chosen at random."""
    k = min(n_patches, max(1, round(fraction * n_patches)))
    order = torch.rand(batch, n_patches, generator=generator).argsort(-1)
    return order < k  # the ranks below k: a uniformly random k-subset per row


class MaskedImageTask(ImageTask):
    def n_patches(self, codec) -> int:
        p = self.recipe.model.patch
        return (codec.height // p) * (codec.width // p)

    def prepare(self, codec):
        recipe = self.recipe
        images, _ = self.labelled("train", fetch=True)  # labels, if any, are not used
        images = self.checked(codec, images, "train")
        n = self.n_patches(codec)
        batches = self.image_batches(codec, images,
                                     lambda idx, g: {"masked": mask_patches(len(idx), n, recipe.train.mask_prob, g)})

        valid = self.labelled("valid", fetch=True)
        log(f"{len(images):,} training images for masked-image pretraining ({recipe.train.mask_prob:.0%} of "
            f"the {n} patches masked)" + (f", {len(valid[0]):,} validation images" if valid else ""))
        if valid is None:
            return batches, None
        v_images = self.checked(codec, valid[0], "valid")
        return batches, lambda model, device, autocast: self.reconstruction_eval(model, codec, v_images, device,
                                                                                 autocast)

    @torch.no_grad()
    def reconstruction_eval(self, model, codec, images: np.ndarray, device, autocast=None) -> dict:
        """The mean squared error per masked patch, with the same seeded masks every time."""
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(VALID_SEED)
        total, count = 0.0, 0
        for i in range(0, len(images), EVAL_BATCH):
            x = codec.tensor(images[i:i + EVAL_BATCH])
            batch = {"image": x, "masked": mask_patches(len(x), self.n_patches(codec), self.recipe.train.mask_prob, g)}
            batch = {k: v.to(device) for k, v in batch.items()}
            with (autocast or contextlib.nullcontext)():
                loss, _, _ = model.loss(batch)
            total, count = total + float(loss), count + model.count_tokens(batch)
        model.train(was)
        return {"loss": total / max(count, 1), "patches": count}

    def evaluate(self, model, codec, *, split: str, data: str | None, device, options: EvalOptions) -> dict:
        return self.reconstruction_eval(model, codec, self.split_images(codec, split, data)[0], device)

    def generate(self, model, codec, lines, settings: GenerateSettings):
        raise UsageError("a mim run reconstructs masked patches; start a vit classifier from it (init_from) "
                         "and label images with that")
